"""Mesh construction and the one rules table mapping logical axis names to mesh axes."""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or a tuple of them, or None = replicated). MaxText-style: a dim whose
# size the mesh axes do not divide, or whose mesh axis an earlier dim already took, is replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('layers', None),
    ('norm', None),
    ('codebook', None),
    ('audio_vocab', None),
    ('depth_embed', 'fsdp'),
    ('depth_heads', 'tensor'),
    ('depth_mlp', 'tensor'),
    ('qkv', None),
    ('time', None),
    ('channel', None),
    ('conv_kernel', None),  # Mimi (flmjax.codec): small enough to replicate everywhere
    ('conv_in', None),
    ('conv_out', None),
    ('codebook_entries', None),
    ('codebook_dim', None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (classic jit-with-shardings behaviour)."""
  devices = list(devices if devices is not None else jax.devices())
  need = data * fsdp * tensor
  if need > len(devices):
    raise ValueError(f'mesh data={data} fsdp={fsdp} tensor={tensor} needs {need} devices; '
                     f'{len(devices)} are visible')
  grid = np.asarray(devices[:need]).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes a multi-host job."""
  markers = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES',
             'SLURM_JOB_NUM_NODES', 'OMPI_COMM_WORLD_SIZE')
  # jax.process_count() would start the backends, after which initialize() must fail.
  if any(os.environ.get(m) for m in markers) and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize()
      return True
    except (RuntimeError, ValueError) as e:  # already initialised or a single-host job
      if 'already' not in str(e):
        raise
  return False


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name is not None and name not in table:
      raise KeyError(f'logical axis {name!r} has no rule in the sharding rules table')
    target = table.get(name) if name is not None else None
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    names = tuple(n for n in names if n in mesh.shape and n not in used)
    ways = math.prod(mesh.shape[n] for n in names)
    if not names or size % ways or ways == 1:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def named_sharding(axes, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES):
  """NamedShardings for every Variable of an nnx.State, from its `axes` metadata."""
  def one(v):
    axes = v.get_metadata().get('axes')
    shape = v.get_value().shape
    if axes is None:
      return NamedSharding(mesh, P())
    return named_sharding(axes, shape, mesh, rules)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=RULES) -> NamedSharding:
  """Leading batch dim over (data, fsdp); the rest replicated."""
  target = dict(rules)['batch']
  names = tuple(n for n in ((target,) if isinstance(target, str) else target) if n in mesh.shape)
  return NamedSharding(mesh, P(names, *([None] * (ndim - 1))))
