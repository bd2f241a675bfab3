"""What a compiled decode frame moves: its collectives' sizes (from the compiled HLO) and the
bytes it reads from HBM per chip, with the HBM-bound frame time those give (an estimate).

A decode frame at serving batch sizes is a chain of matrix-vector products: every weight and the
whole KV cache are read once per frame (the cache is attended in full, masked), so the time is
about bytes / HBM bandwidth. The estimate leaves out compute, collectives and launch overheads:
it is a lower bound, to be replaced by a measurement on a chip.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from flmjax import sharding as shd

MIB = 2**20
# HBM bandwidth per chip, GB/s (the vendors' figures).
HBM_GBPS = {'v4': 1228.0, 'v5e': 819.0, 'v5p': 2765.0, 'v6e': 1640.0}
# bfloat16 matmul peak per chip, TFLOP/s (the vendors' figures).
PEAK_TFLOPS = {'v4': 275.0, 'v5e': 197.0, 'v5p': 459.0, 'v6e': 918.0}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
}
_OP = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_SHAPE = re.compile(r'\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]')
# Depth-transformer layer weights a frame reads once per codebook step (the others once: tables
# and per-codebook weights are indexed, so a frame reads only the rows or the codebook it uses).
PER_CODEBOOK = frozenset({'ln_1', 'qkv', 'proj', 'ln_2'})
LOOKUP_TABLES = frozenset({'text_embed', 'speak_embed', 'listen_embed', 'wtes'})


def collective_sizes(hlo: str) -> list[tuple[str, int, str]]:
  """(kind, bytes, instruction) of every collective in compiled HLO text; bytes is its largest
  array, operand or result (an all-gather's result, a reduce-scatter's operand)."""
  out = []
  for line in hlo.splitlines():
    op = _OP.search(line)
    if not op:
      continue
    sizes = [
      math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES[dt]
      for dt, dims in _SHAPE.findall(line)
      if dt in _DTYPE_BYTES
    ]
    out.append((op.group(1), max(sizes, default=0), line.strip()))
  return out


def largest_collective_mib(hlo: str) -> float:
  return round(max((b for _, b, _ in collective_sizes(hlo)), default=0) / MIB, 3)


def frame_read_bytes(
  params, param_shardings, state, state_shardings, num_codebooks: int, batch: int
) -> int:
  """Bytes one decode frame reads from HBM on one chip (pure dicts of ShapeDtypeStructs and
  their NamedShardings): each weight once (depth attention weights once per codebook step;
  embedding tables only the rows looked up), the whole KV cache once, the rest of the state."""
  total = 0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, x), sharding in zip(flat, jax.tree.leaves(param_shardings)):
    # The last dict key: a weight split into per-layer buffers (params.split_leading) keeps it.
    name = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    read = shd.bytes_per_device(x, sharding)
    if name in LOOKUP_TABLES:  # B rows (B x C for the per-codebook tables), at most all of them
      rows = batch * (num_codebooks if x.ndim == 3 else 1)
      row = sharding.shard_shape(tuple(x.shape))[-1] * np.dtype(x.dtype).itemsize
      read = min(read, rows * row)
    elif name in PER_CODEBOOK:
      read *= num_codebooks
    total += read
  return total + sum(
    shd.bytes_per_device(x, s)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings))
  )


def frame_ms_estimate(read_bytes: int, chip: str) -> float:
  """The HBM-bound frame time in ms: read_bytes / the chip's bandwidth (an estimate)."""
  return round(read_bytes / (HBM_GBPS[chip] * 1e9) * 1e3, 2)
