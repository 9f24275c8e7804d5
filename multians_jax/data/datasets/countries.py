"""``countries``: multi-answer geography questions with complete answer sets.

Built from the per-country JSON files shipped in the ``countryinfo`` PyPI
package (MIT). Question kinds:

- ``borders``: "Name a country that shares a land border with X." Gold set =
  every neighbour of X. The package's border lists are not always symmetric
  (e.g. Nepal lists China but China omits Nepal), so neighbours are the
  symmetric closure. A question is kept only when X has >= 2 neighbours and
  every neighbour code resolves to a country in the package (so the set is
  complete; countries bordering Kosovo, absent from the package, are left
  out).
- ``subregion``: "Name a country in the UN geoscheme subregion S."
- ``currency``: "Name a country that uses the currency with ISO 4217 code C."

Each gold entry is one country with aliases: its name and the package's
alternative spellings, minus bare ISO 3166 codes (two-letter codes such as
"NO", "IN" or "IT" are ordinary words and would match by accident; "USA" is
kept). Duplicate files for one ISO code are merged; the dissolved "Serbia
and Montenegro" is excluded.

Splits: by subject, so all questions about one country (or subregion, or
currency) are on one side, and no question text or answer set appears in
both splits.
"""

import collections
import glob
import json
import os

from multians_jax.data.datasets import base, schema

_DESCRIPTION = __doc__
_EXCLUDED = frozenset({"SCG"})  # Serbia and Montenegro, dissolved 2006.
_KEPT_CODES = frozenset({"USA"})
_CITATION = """\
@misc{countryinfo,
  title={countryinfo: a Python module for returning data about countries},
  author={Porimol Chandro and contributors},
  howpublished={\\url{https://pypi.org/project/countryinfo/}},
}"""


def _load(data_dir: str) -> dict[str, dict]:
  """alpha3 → country dict (duplicates merged, excluded codes dropped)."""
  by_code = {}
  for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
    with open(path, encoding="utf-8") as f:
      c = json.load(f)
    code = (c.get("ISO") or {}).get("alpha3")
    if not code or code in _EXCLUDED:
      continue
    if code in by_code:
      old = by_code[code]
      old["altSpellings"] = old["altSpellings"] + c.get("altSpellings", [])
      continue
    c["altSpellings"] = list(c.get("altSpellings") or [])
    by_code[code] = c
  return by_code


def _aliases(c: dict) -> list[str]:
  codes = {c["ISO"].get("alpha2"), c["ISO"].get("alpha3")} - _KEPT_CODES
  out = []
  for alias in [c["name"], *c["altSpellings"]]:
    if alias and alias not in codes and alias not in out:
      out.append(alias)
  return out


def _neighbours(by_code: dict[str, dict]) -> dict[str, set[str] | None]:
  """alpha3 → symmetric set of neighbours; None if a code is unresolved."""
  alpha2 = {c["ISO"].get("alpha2"): k for k, c in by_code.items()}
  graph = collections.defaultdict(set)
  broken = set()
  for code, c in by_code.items():
    for other in c.get("borders") or []:
      resolved = other if other in by_code else alpha2.get(other)
      if resolved is None:
        broken.add(code)
        continue
      graph[code].add(resolved)
      graph[resolved].add(code)
  return {k: (None if k in broken else graph[k]) for k in by_code}


def _entries(by_code: dict[str, dict], codes) -> list[list[str]]:
  return [_aliases(by_code[k]) for k in sorted(codes)]


def _border_records(by_code: dict[str, dict]) -> list[dict]:
  records = []
  for code, near in sorted(_neighbours(by_code).items()):
    if near is None or len(near) < 2:
      continue
    name = by_code[code]["name"]
    records.append(
      schema.make(
        f"borders-{code}",
        f"Name a country that shares a land border with {name}.",
        _entries(by_code, near),
        family="qa",
        meta={"kind": "borders", "subject": code, "split_groups": [code]},
      )
    )
  return records


def _group_records(by_code: dict[str, dict], kind: str) -> list[dict]:
  groups = collections.defaultdict(set)
  for code, c in by_code.items():
    if kind == "subregion":
      values = [c.get("subregion")]
    else:
      values = c.get("currencies") or []
    for value in values:
      if value:
        groups[value].add(code)
  text = {
    "subregion": "Name a country in the UN geoscheme subregion {}.",
    "currency": "Name a country that uses the currency with ISO 4217 code {}.",
  }[kind]
  return [
    schema.make(
      f"{kind}-{value}",
      text.format(value),
      _entries(by_code, codes),
      family="qa",
      meta={"kind": kind, "subject": value, "split_groups": [group]},
    )
    for value, codes in sorted(groups.items())
    if len(codes) >= 2
    for group in [f"{kind}:{value}"]
  ]


def records_from(data_dir: str) -> list[dict]:
  """All question records from a ``countryinfo/data`` directory."""
  by_code = _load(data_dir)
  return (
    _border_records(by_code)
    + _group_records(by_code, "subregion")
    + _group_records(by_code, "currency")
  )


class Countries(base.RecordBuilder):
  """Geography list questions from the ``countryinfo`` package."""

  name = "countries"
  DESCRIPTION = _DESCRIPTION
  CITATION = _CITATION
  LICENSE = "MIT (countryinfo package and data)."
  HOMEPAGE = "https://pypi.org/project/countryinfo/"

  def _records(self, dl_manager) -> list[dict]:
    pkg = base.package_dir("countryinfo", "countryinfo", self.name)
    return records_from(os.path.join(pkg, "data"))
