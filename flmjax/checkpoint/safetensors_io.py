"""Safetensors files through the `safetensors` library, on numpy (no torch), with flmjax's checks:
a truncated file, a header the library cannot parse, or a dtype flmjax does not read raises
CorruptCheckpointError in one line that names the file."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

# safetensors' numpy reader asks numpy for the dtype named 'bfloat16'; only ml_dtypes registers it.
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from flmjax.errors import FlmjaxError

DTYPES = {
  'F32': np.dtype(np.float32),
  'F16': np.dtype(np.float16),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'F64': np.dtype(np.float64),
  'I64': np.dtype(np.int64),
  'I32': np.dtype(np.int32),
  'I16': np.dtype(np.int16),
  'I8': np.dtype(np.int8),
  'U8': np.dtype(np.uint8),
  'BOOL': np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
# What safetensors (>= 0.8) says of a file that ends before or after its header's last tensor.
_SHORT = ('invalid header length', 'file not fully covered')


class CorruptCheckpointError(FlmjaxError, ValueError):
  """A checkpoint exists but cannot be read: a truncated safetensors file or unreadable header,
  an unreadable index, or a training checkpoint step that does not restore. The one error of its
  kind in flmjax (flmjax.CorruptCheckpointError)."""


@dataclass(frozen=True)
class TensorInfo:
  file: str
  key: str
  dtype: np.dtype
  shape: tuple[int, ...]


def _problem(path: str, e: Exception) -> str:
  """The library's reason, in flmjax's words: truncation is named as such."""
  reason = str(e).removeprefix('Error while deserializing header: ')
  size = os.path.getsize(path)
  if 'header too small' in reason:
    return f'{path}: truncated safetensors file ({size} bytes, no header)'
  if any(s in reason for s in _SHORT):
    return (
      f'{path}: truncated safetensors file: its {size} bytes end before or after the tensors its '
      f'header lists ({reason})'
    )
  return f'{path}: corrupt safetensors header: {reason}'


def _open(path: str):
  try:
    return safetensors.safe_open(path, framework='numpy')
  except safetensors.SafetensorError as e:
    raise CorruptCheckpointError(_problem(path, e)) from None


def read_header(path: str) -> dict[str, TensorInfo]:
  """{key: TensorInfo} of a safetensors file, in file order; no tensor is read. The library
  checks that the header parses and that the tensors' bytes fill the file exactly."""
  out = {}
  with _open(path) as f:
    for key in f.offset_keys():
      view = f.get_slice(key)
      code = view.get_dtype()
      if code not in DTYPES:
        raise CorruptCheckpointError(
          f'{path}: tensor {key!r} is {code}, a dtype flmjax does not read ({sorted(DTYPES)})'
        )
      out[key] = TensorInfo(path, key, DTYPES[code], tuple(view.get_shape()))
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """One tensor, read into memory (the file's other tensors are not read)."""
  with _open(info.file) as f:
    try:
      arr = f.get_tensor(info.key)
    except safetensors.SafetensorError as e:
      raise CorruptCheckpointError(f'{info.file}: tensor {info.key!r}: {e}') from None
  if arr.dtype != info.dtype or arr.shape != info.shape:
    raise CorruptCheckpointError(
      f'{info.file}: tensor {info.key!r} is {arr.dtype} {arr.shape}, its header said '
      f'{info.dtype} {info.shape}: the file changed while it was read'
    )
  return arr


def write_file(
  path: str,
  specs: list[tuple[str, np.dtype, tuple[int, ...]]],
  produce: Callable[[str], np.ndarray],
) -> int:
  """Writes tensors `specs` (key, dtype, shape) as one safetensors file; `produce(key)` gives each
  array. The file's tensors are in memory together until it is written (the library's writer
  takes them all), so a caller bounds memory by the file's size (save_official writes shards).

  Returns the bytes of tensor data written.
  """
  tensors = {}
  for key, dtype, shape in specs:
    if np.dtype(dtype) not in NAMES:
      raise ValueError(f'{key}: dtype {np.dtype(dtype)} is not one flmjax reads back')
    arr = np.ascontiguousarray(produce(key), dtype=dtype)
    if arr.shape != tuple(shape):
      raise ValueError(f'{key}: produced shape {arr.shape}, header says {tuple(shape)}')
    tensors[key] = arr
  safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  return sum(a.nbytes for a in tensors.values())
