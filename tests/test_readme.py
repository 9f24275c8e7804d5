"""The README's test command is what CI runs."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci.endswith("python -m pytest -q")
  assert f"```bash\n{ci}\n```" in readme


def test_the_readme_is_a_readme():
  """Set-up, the two commands and pointers; the reference lives in
  docs/GUIDE.md, results in BENCHMARKS.md and STUDY.md."""
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  demo = "python -m multians_jax.main --config=configs/demo.py"
  assert demo in readme and "python -m pytest -q" in readme
  assert (ROOT / "docs" / "GUIDE.md").exists() and "docs/GUIDE.md" in readme
  # Dated figures live in one place each (BENCHMARKS.md, STUDY.md), so the
  # README states none.
  import re

  assert not re.findall(r"20\d\d-\d\d-\d\d", readme)


def _documented_defaults(text: str):
  """(key, value) for every default a document states next to its key:
  ``key`` (default ``v``), ``key`` X (``v``), and pairs written
  ``a`` / ``b`` (``x`` / ``y``); a list of choices (``v`` | ...) is not
  a default."""
  import re

  key = r"`([a-z_]+\.[a-z_0-9]+)`"
  pat = re.compile(
    key + r"(?: / " + key + r")?[^`\n(]{0,40}\((?:default )?`([^`]*)`"
    r"(?: / `([^`]*)`)?( \|)?"
  )
  for m in pat.finditer(text):
    a, b, x, y, choices = m.groups()
    if choices:
      continue
    yield a, x
    if b and y is not None:
      yield b, y


def test_method_states_the_config_defaults():
  """Every default docs/METHOD.md states is the config tree's (the one
  set of defaults, ``RunConfig()`` = ``configs/base.py``)."""
  from multians_jax.config import RunConfig

  tree = RunConfig().to_dict()
  found = list(_documented_defaults((ROOT / "docs" / "METHOD.md").read_text()))
  assert len(found) >= 25, found  # the parser still reads the document
  wrong = {}
  for k, text in found:
    section, field = k.split(".")
    if section not in tree or field not in tree[section]:
      continue  # a key of another kind (``matchers.MATCHERS``)
    want = tree[section][field]
    if isinstance(want, bool) or isinstance(want, str):
      ok = text == str(want) or (want == "" and text == "''")
    else:
      ok = float(text) == float(want)
    if not ok:
      wrong[k] = (text, want)
  assert not wrong, wrong
