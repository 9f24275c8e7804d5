"""Datasets as tensorflow-datasets builders, used without TensorFlow.

Builders (``BUILDERS``) write array_record files; readers use
``tfds.data_source`` (random access, no TensorFlow). Every dataset follows
the record schema of ``schema`` (METHOD §7) with ``train``/``test`` splits.

  from multians_jax.data import datasets
  datasets.build("countries", "/data/tfds")
  source = datasets.load("countries", "train", "/data/tfds")
  source[0]["answers"]  # [["France", ...], ...]

``hpo_ddx`` has configs ``default`` and ``small`` (name them as
``"hpo_ddx/small"`` in ``load``, ``config="small"`` in ``build``).
"""

import contextlib
import io
import os
import shutil
import tempfile

import tensorflow_datasets as tfds
from absl import logging

from multians_jax.data.datasets import (
  countries,
  distlab,
  fanout_lists,
  hpo_ddx,
  humaneval,
  multians_jsonl,
  schema,
)

BUILDERS = {
  "multians_jsonl": multians_jsonl.MultiansJsonl,
  "countries": countries.Countries,
  "distlab": distlab.Distlab,
  "fanout_lists": fanout_lists.FanoutLists,
  "hpo_ddx": hpo_ddx.HpoDdx,
  "humaneval": humaneval.Humaneval,
}


def builder_class(name: str):
  """The registered builder class for ``name`` (clear error if unknown)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; one of {sorted(BUILDERS)}")
  return BUILDERS[name]


def build(
  name: str, data_dir: str, manual_dir: str | None = None, **kwargs
) -> tfds.core.DatasetBuilder:
  """Builds dataset ``name`` into ``data_dir`` as array_record files.

  Args:
    name: a key of ``BUILDERS``.
    data_dir: the TFDS data dir (``<data_dir>/<name>/[<config>/]<version>``).
    manual_dir: TFDS manual dir (``multians_jsonl`` reads ``*.jsonl`` there).
    **kwargs: passed to the builder (``config="small"``, ``jsonl=[...]``).

  Returns:
    The prepared builder.

  On failure nothing is left in ``data_dir`` that was not there before
  (TFDS writes into a temporary dir and renames it only on success; the
  dataset's directory is removed if this call created it).
  """
  cls = builder_class(name)
  dataset_dir = os.path.join(data_dir, cls.name)
  existed = os.path.exists(dataset_dir)
  try:
    builder = cls(data_dir=data_dir, file_format="array_record", **kwargs)
    with tempfile.TemporaryDirectory() as downloads, _tfds_output():
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      builder.download_and_prepare(
        download_dir=downloads, download_config=config
      )
  except BaseException:
    if not existed:
      shutil.rmtree(dataset_dir, ignore_errors=True)
    raise
  return builder


@contextlib.contextmanager
def _tfds_output():
  """TFDS's progress bars and "Downloading and preparing" lines only when
  absl logs at INFO or more (``--verbosity=0``); otherwise silent."""
  if logging.get_verbosity() >= logging.INFO:
    yield
    return
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)


class Records:
  """A decoded view of a TFDS data source: ``len`` and ``[i]`` → record."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return schema.decode(self.source[index])


def load(name: str, split: str, data_dir: str) -> Records:
  """Opens a built split with ``tfds.data_source`` (no TensorFlow).

  Args:
    name: dataset name, optionally with config (``"hpo_ddx/small"``).
    split: ``"train"``, ``"test"``, or TFDS split syntax (``"train+test"``).
    data_dir: where it was built.
  """
  base_name = name.split("/")[0]
  builder_class(base_name)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return Records(source)
