"""safetensors files, read lazily and written directly (no torch).

``SafetensorsSource`` serves the tensors of an HF directory, local (memory
maps) or remote (any ``etils.epath`` URI such as ``gs://``: byte-range
reads of only the rows asked for); ``write_safetensors`` writes one file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath


def is_remote(path) -> bool:
  """A URI (``gs://``, ``s3://``, …) read through ``etils.epath``."""
  return "://" in os.fspath(path)


_ST_DTYPES = {
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F64": np.float64,
  "I64": np.int64,
  "I32": np.int32,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsSource:
  """HF tensors of a directory (single file or sharded with an index),
  local or any ``epath`` URI (``gs://``, ``s3://``, …). Local files are
  memory-mapped; remote ones are read by byte range through open handles,
  ``get(name, rows=(a, b))`` reading rows a..b of the leading axis only.
  ``bytes_read`` counts the tensor bytes read from a remote directory."""

  reads_rows = True

  def __init__(self, path: str):
    root = epath.Path(path)
    self.remote = is_remote(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
      try:
        files = sorted(
          set(json.loads(index.read_text())["weight_map"].values())
        )
      except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
    elif (root / "model.safetensors").exists():
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
    self._where: dict[str, tuple[Any, dict, int]] = {}
    self._handles: dict[str, Any] = {}
    self.bytes_read = 0
    self.nbytes = 0
    for fname in files:
      full = root / fname
      if not full.exists():
        raise FileNotFoundError(f"{full}: named by the index but missing")
      header, start = _read_header(full)
      for name, info in header.items():
        if name != "__metadata__":
          self._where[name] = (full, info, start)
          b, e = info["data_offsets"]
          self.nbytes += e - b

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    full, info, start = self._where[name]
    b, e = info["data_offsets"]
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = list(info["shape"])
    if rows is not None and shape:
      lo, hi = rows
      if not 0 <= lo <= hi <= shape[0]:
        raise IndexError(f"{name}: rows {rows} outside [0, {shape[0]}]")
      row = dt.itemsize * math.prod(shape[1:])
      b, e = b + lo * row, b + hi * row
      shape[0] = hi - lo
    if not self.remote:
      mm = np.memmap(
        os.fspath(full), dtype=np.uint8, mode="r", offset=start + b,
        shape=(e - b,),
      )  # fmt: skip
      return mm.view(dt).reshape(shape)
    f = self._handles.get(str(full))
    if f is None:
      f = self._handles[str(full)] = full.open("rb")
    f.seek(start + b)
    data = f.read(e - b)
    if len(data) != e - b:
      raise ValueError(f"{full}: truncated while reading tensor {name}")
    self.bytes_read += len(data)
    return np.frombuffer(data, dt).reshape(shape)

  def close(self) -> None:
    for f in self._handles.values():
      f.close()
    self._handles.clear()

  def __enter__(self) -> SafetensorsSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _read_header(path) -> tuple[dict, int]:
  path = epath.Path(path)
  size = path.stat().length
  with path.open("rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(raw, "little")
    if n > size - 8:
      raise ValueError(f"{path}: truncated safetensors header")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
  end = max(
    (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
    default=0,
  )
  if 8 + n + end > size:
    raise ValueError(
      f"{path}: truncated safetensors file ({size} bytes, header says "
      f"{8 + n + end}); re-download or re-export it"
    )
  for k, v in header.items():
    if k != "__metadata__" and v["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {k} has unsupported dtype {v['dtype']}")
  return header, 8 + n


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  off = 0
  for name, x in tensors.items():
    nbytes = x.nbytes
    header[name] = {
      "dtype": _ST_NAMES[x.dtype],
      "shape": list(x.shape),
      "data_offsets": [off, off + nbytes],
    }
    off += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for x in tensors.values():
      f.write(np.ascontiguousarray(x).tobytes())
  os.replace(tmp, path)
