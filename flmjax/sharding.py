"""Mesh construction and the one rules table mapping logical axis names to mesh axes."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax.errors import FlmjaxError

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or a tuple of them, or None = replicated). Parameters are named by
# what their dims are; activations by MaxText-style 'activation_*' names, pinned at every layer
# boundary (`constrain`) so batch stays over (data, fsdp) and each layer's weights are gathered
# instead of its activations. A dim whose mesh axis an earlier dim already took is replicated.
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
  ('embed_codebook', 'tensor'),  # the speak/listen tables' codebooks: their only tensor split
  ('audio_vocab', None),
  ('depth_embed', 'fsdp'),
  ('depth_heads', 'tensor'),
  ('depth_mlp', 'tensor'),
  ('qkv', None),
  ('lora_rank', None),  # LoRA adapters' rank r: small, replicated (the other dim follows W)
  ('time', None),
  ('channel', None),
  ('conv_kernel', None),  # Mimi (flmjax.codec): small enough to replicate everywhere
  ('conv_in', None),
  ('conv_out', None),
  ('codebook_entries', None),
  ('codebook_dim', None),
  ('activation_batch', ('data', 'fsdp')),
  ('activation_length', None),
  ('activation_embed', None),
  ('activation_heads', 'tensor'),
  ('activation_kv_heads', 'tensor'),
  ('activation_mlp', 'tensor'),
  ('activation_depth_mlp', 'tensor'),
  ('activation_vocab', 'tensor'),
)

# Dims left replicated on purpose when the mesh does not divide them: fewer KV heads than tensor
# shards is usual for GQA (each shard keeps the KV heads its query heads read). Every other dim
# the mesh does not divide is an error, never a silent replication.
# The speak/listen tables (8 codebooks) take tensor when it divides 8, else they stay as they
# were, FSDP-sharded only (tensor 7, 14, 28).
# The text vocab and the depth MLP are padded for the tensor axis (ModelConfig.tensor_parallel),
# so they always divide.
REPLICATED_IF_INDIVISIBLE = frozenset({'kv_heads', 'activation_kv_heads', 'embed_codebook'})


class ShardingError(FlmjaxError, ValueError):
  """The mesh does not fit the model: a dim it shards is not a multiple of its mesh axes."""


def device_grid(
  ici: Sequence[int], dcn: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> np.ndarray:
  """Devices laid out as [data, fsdp, tensor] = ici * dcn, from the topology.

  Inside a slice, mesh_utils orders devices so that each axis's neighbours are ICI neighbours.
  With several slices (dcn product > 1) each slice is one block of the grid (create_hybrid_device_
  mesh), so only the dcn-multiplied axes cross the slower data-center network. When every device
  is in slice 0 (CPU, GPU, one TPU slice), each process counts as a slice.
  """
  devices = list(devices if devices is not None else jax.devices())
  need = math.prod(ici) * math.prod(dcn)
  if need > len(devices):
    raise ValueError(f'mesh {describe(ici, dcn)} needs {need} devices; {len(devices)} are visible')
  devices = devices[:need]
  if math.prod(dcn) == 1:
    return mesh_utils.create_device_mesh(tuple(ici), devices, allow_split_physical_axes=True)
  by_process = not any(getattr(d, 'slice_index', 0) for d in devices)  # one slice (or none)
  granules = len({d.process_index if by_process else d.slice_index for d in devices})
  if granules != math.prod(dcn):
    raise ValueError(
      f'mesh {describe(ici, dcn)}: dcn_data x dcn_fsdp = {math.prod(dcn)} must '
      f'equal the number of {"processes" if by_process else "slices"}, {granules}'
    )
  return mesh_utils.create_hybrid_device_mesh(
    tuple(ici), tuple(dcn), devices, process_is_granule=by_process, allow_split_physical_axes=True
  )


def parse_axes(
  text: str, flag: str = '`mesh`', axes: Sequence[str] = MESH_AXES, example: str = 'data=2,tensor=4'
) -> dict[str, int]:
  """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}: sizes of the named mesh `axes` (others 1).
  ValueError naming `flag` (the argument; a command spells it as its flag): a size below 1, or
  text that is not axis=size pairs."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, eq, size = (x.strip() for x in part.partition('='))
    number = size[1:] if size[:1] in '+-' else size
    if eq and name in axes and name not in out and number.isdigit() and int(size) < 1:
      raise ValueError(f'{flag} {text!r}: {name}={size}: mesh sizes must be >= 1')
    if not eq or name not in axes or name in out or not number.isdigit():
      listed = ', '.join(axes[:-1]) + ' and ' + axes[-1] if len(axes) > 1 else axes[0]
      raise ValueError(
        f'{flag} {text!r}: expected comma-separated axis=size pairs with axes {listed}, '
        f'e.g. {example}'
      )
    out[name] = int(size)
  return out


def describe(ici: Sequence[int], dcn: Sequence[int] = (1, 1, 1)) -> str:
  out = ' '.join(f'{n}={k}' for n, k in zip(MESH_AXES, ici))
  return out + ''.join(f' dcn_{n}={k}' for n, k in zip(MESH_AXES, dcn) if k != 1)


def make_mesh(
  data: int = 1,
  fsdp: int = 1,
  tensor: int = 1,
  devices: Sequence[jax.Device] | None = None,
  *,
  dcn_data: int = 1,
  dcn_fsdp: int = 1,
) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (classic jit-with-shardings behaviour).

  data, fsdp, tensor are per slice; dcn_data / dcn_fsdp slices multiply the data / fsdp axes, so
  the mesh axes (and the rules table) are the same on one slice and on many.
  """
  grid = device_grid((data, fsdp, tensor), (dcn_data, dcn_fsdp, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
  """The PartitionSpec of a tensor with logical `axes` and `shape` on `mesh`.

  Raises ShardingError when a dim's mesh axes do not divide it (unless the dim is in
  REPLICATED_IF_INDIVISIBLE).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name is not None and name not in table:
      raise KeyError(f'logical axis {name!r} has no rule in the sharding rules table')
    target = table.get(name) if name is not None else None
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    names = tuple(n for n in names if n in mesh.shape and n not in used and mesh.shape[n] > 1)
    ways = math.prod(mesh.shape[n] for n in names)
    if not names or (size % ways and name in REPLICATED_IF_INDIVISIBLE):
      spec.append(None)
      continue
    if size % ways:
      raise ShardingError(
        f'logical axis {name!r} of size {size} does not divide over mesh axes '
        f'{" x ".join(f"{n}={mesh.shape[n]}" for n in names)} = {ways}: pick mesh sizes that '
        f'divide it (tensor axes {tuple(axes)}, shape {tuple(shape)})'
      )
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def replicating(rules, axes: Iterable[str]):
  """`rules` with the logical `axes` mapped to no mesh axis (replicated)."""
  axes = set(axes)
  return tuple((name, None if name in axes else target) for name, target in rules)


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


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  """tokens/weights [B,Z,T]: batch over (data, fsdp), channels and columns replicated."""
  s = batch_sharding(mesh, 3)
  return {'tokens': s, 'weights': s}


def activation_constraint(mesh: Mesh):
  """x, logical axes -> x pinned to the rules table's sharding (batch over data+fsdp, vocab over
  tensor), so the logits stay sharded instead of being gathered."""
  return lambda x, axes: jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))


def to_global(batch: dict, shardings: dict) -> dict[str, jax.Array]:
  """This host's rows -> global arrays laid out by `shardings` (works single- and multi-host)."""
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
    for k in ('tokens', 'weights')
  }


def valid_tensor_sizes(num_heads: int) -> list[int]:
  return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def validate_mesh(cfg, mesh_shape) -> None:
  """Raises ShardingError when the mesh's tensor size does not divide the query heads of `cfg`
  (a ModelConfig). Fewer KV heads than tensor is fine: they are replicated on purpose."""
  tensor = dict(mesh_shape).get('tensor', 1)
  if cfg.num_heads % tensor:
    raise ShardingError(
      f"mesh tensor={tensor} does not divide the model's {cfg.num_heads} query heads; "
      f'valid tensor sizes: {", ".join(map(str, valid_tensor_sizes(cfg.num_heads)))}'
    )


def traced_on(mesh: Mesh | None, fn):
  """`fn` traced with `mesh` in context (`fn` itself when mesh is None): the model's layer-boundary
  constraints (`constrain`) apply, and code that must know the mesh (splash attention, the Pallas
  depth kernels, the vocab-sharded sampler) reads it with jax.sharding.get_abstract_mesh()."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """x pinned to the rules table's sharding of its logical `axes` on the mesh in context
  (`traced_on`, which the train and eval steps, the decoder and the server's frame use).
  Outside one (single-device calls) it returns x unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def bytes_per_device(x, sharding: NamedSharding) -> int:
  """Bytes of one device's shard of `x` (an array or ShapeDtypeStruct)."""
  shard = sharding.shard_shape(tuple(x.shape))
  return math.prod(shard) * np.dtype(x.dtype).itemsize


def sharding_report(
  params, shardings, opt_state=None, opt_shardings=None, frozen=None
) -> list[str]:
  """Lines describing each parameter (path, shape, spec, bytes per device) and the totals;
  `frozen` (LoRA's base, ShapeDtypeStructs with shardings) adds its total."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  sizes = ' '.join(f'{k}={v}' for k, v in mesh.shape.items())
  lines = [f'sharding report (mesh {sizes}):']
  total = 0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    per = bytes_per_device(x, s)
    total += per
    spec = ', '.join(str(a) for a in s.spec) or 'replicated'
    lines.append(
      f'  {name:34s} {str(list(x.shape)):24s} {np.dtype(x.dtype).name:8s} '
      f'{"P(" + spec + ")":36s} {per / 2**20:10.2f} MiB/device'
    )
  lines.append(f'  params: {total / 2**30:.3f} GiB/device')
  if opt_state is not None:
    opt = sum(
      bytes_per_device(x, s)
      for x, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_shardings))
    )
    lines.append(f'  optimizer state: {opt / 2**30:.3f} GiB/device')
  if frozen is not None:
    leaves = jax.tree.leaves(frozen)
    base = sum(bytes_per_device(x, x.sharding) for x in leaves)
    dtypes = sorted({np.dtype(x.dtype).name for x in leaves})
    lines.append(
      f'  frozen base ({"/".join(dtypes)}): {base / 2**30:.3f} GiB/device; trainable '
      f'{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)):,} params'
    )
  return lines
