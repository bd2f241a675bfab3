"""A small safetensors reader/writer on numpy memmaps: no torch, one tensor in memory at a time."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

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


class CorruptCheckpointError(FlmjaxError, ValueError):
  """A checkpoint exists but cannot be read: a truncated safetensors file or unreadable header,
  an unreadable index, or a training checkpoint step that does not restore. The one error of its
  kind in flmjax (flmjax.CorruptCheckpointError)."""


@dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  end: int


def read_header(path: str) -> dict[str, TensorInfo]:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CorruptCheckpointError(f'{path}: truncated safetensors file ({size} bytes, no header)')
    (n,) = struct.unpack('<Q', raw)
    if 8 + n > size:
      raise CorruptCheckpointError(
        f'{path}: truncated safetensors file: header claims {n} bytes, file has {size}'
      )
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CorruptCheckpointError(f'{path}: corrupt safetensors header: {e}') from None
  if not isinstance(header, dict):
    raise CorruptCheckpointError(f'{path}: corrupt safetensors header: not a JSON object')
  base = 8 + n
  out = {}
  for key, meta in header.items():
    if key == '__metadata__':
      continue
    try:
      dtype = DTYPES[meta['dtype']]
      shape = tuple(int(s) for s in meta['shape'])
      lo, hi = (int(o) for o in meta['data_offsets'])
    except (KeyError, TypeError, ValueError) as e:
      raise CorruptCheckpointError(f'{path}: corrupt header entry for {key!r}: {e!r}') from None
    if hi - lo != dtype.itemsize * int(np.prod(shape)):
      raise CorruptCheckpointError(
        f'{path}: tensor {key!r} has {hi - lo} bytes for shape {shape} {meta["dtype"]}'
      )
    if base + hi > size:
      raise CorruptCheckpointError(
        f'{path}: truncated safetensors file: tensor {key!r} ends at '
        f'byte {base + hi}, file has {size}'
      )
    out[key] = TensorInfo(path, dtype, shape, base + lo, base + hi)
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """A read-only memmap view; pages are read only when touched."""
  count = int(np.prod(info.shape))
  if count == 0:
    return np.zeros(info.shape, info.dtype)
  return np.memmap(info.file, info.dtype, 'r', offset=info.start, shape=info.shape)


def write_file(path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]], produce) -> int:
  """Writes tensors `specs` (key, dtype, shape) in order; `produce(key)` returns each array.

  Returns the bytes of tensor data written.
  """
  header, offset = {}, 0
  for key, dtype, shape in specs:
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    header[key] = {
      'dtype': NAMES[np.dtype(dtype)],
      'shape': list(shape),
      'data_offsets': [offset, offset + nbytes],
    }
    offset += nbytes
  header['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as HF does
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for key, dtype, shape in specs:
      arr = np.ascontiguousarray(produce(key), dtype=dtype)
      if arr.shape != tuple(shape):
        raise ValueError(f'{key}: produced shape {arr.shape}, header says {tuple(shape)}')
      f.write(arr.tobytes())
    f.flush()
    os.fsync(f.fileno())
  return offset
