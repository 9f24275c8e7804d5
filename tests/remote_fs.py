"""A remote filesystem the tests control: ``gs://`` paths served from memory
by the same ``etils.epath`` → fsspec code path a real bucket takes, with the
bytes read per file counted.

``install()`` routes every ``gs://`` path of this process to a fresh
in-memory store (epath picks its fsspec backend for ``gs://`` when
TensorFlow is absent, as here); ``upload(local_dir, uri)`` copies a local
directory into it.
"""

import collections
import os

from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class CountingMemoryFS(MemoryFileSystem):
  """fsspec's memory filesystem with its own store and a read counter."""

  def __init__(self):
    super().__init__(global_store=False, skip_instance_cache=True)
    self.reads = collections.Counter()  # path → bytes read

  def _open(self, path, mode="rb", **kwargs):
    f = super()._open(path, mode, **kwargs)
    if mode != "rb":
      return f
    # fsspec hands out the stored object itself; a real store gives every
    # open its own handle and position.
    f = MemoryFile(self, f.path, f.getvalue())
    read = f.read

    def counted(n=-1):
      data = read(n)
      self.reads[f.path] += len(data)
      return data

    f.read = counted
    return f


def install(patch=None) -> CountingMemoryFS:
  """A fresh store behind every ``gs://`` path; ``patch`` is pytest's
  ``monkeypatch`` (undone after the test) or None (for the process)."""
  fs = CountingMemoryFS()
  cls = epath_backend._FileSystemSpecBackend
  if patch is None:
    cls.fs = lambda self, path: fs
  else:
    patch.setattr(cls, "fs", lambda self, path: fs)
  assert epath.Path("gs://probe")._backend is epath_backend.fsspec_backend
  return fs


def upload(local_dir, uri: str) -> None:
  dst = epath.Path(uri)
  dst.mkdir(parents=True, exist_ok=True)
  for name in sorted(os.listdir(local_dir)):
    src = os.path.join(local_dir, name)
    if os.path.isfile(src):
      with open(src, "rb") as f:
        (dst / name).write_bytes(f.read())
