"""Load and save the official FLM-Audio checkpoint layout (HF-style safetensors shards)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import defaultdict

import jax
import numpy as np
from flax import nnx

from flmjax import sharding as shd
from flmjax.checkpoint import kinds
from flmjax.checkpoint import safetensors_io as st
from flmjax.checkpoint.layout import Entry, entries
from flmjax.config import ModelConfig
from flmjax.errors import FlmjaxError
from flmjax.model.flm import FLMAudio, abstract

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
_NP = {
  'float32': np.dtype(np.float32),
  'bfloat16': st.DTYPES['BF16'],
  'float16': np.dtype(np.float16),
}


class CheckpointError(FlmjaxError, ValueError):
  """Keys, shapes or config of a checkpoint do not match the model."""


def _flat_params(state) -> dict[tuple[str, ...], nnx.Variable]:
  return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def _grouped(cfg: ModelConfig) -> dict[tuple[str, ...], list[Entry]]:
  groups: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
  for e in entries(cfg):
    groups[e.path].append(e)
  return groups


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{official key: shape} that save_official writes, from the abstract tree (no allocation)."""
  params = _flat_params(nnx.state(abstract(cfg)))
  return {
    e.key: e.torch_shape(params[e.path].get_value().shape[len(e.index) :]) for e in entries(cfg)
  }


def _tensor_index(path: str) -> dict[str, st.TensorInfo]:
  index_file, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
  if os.path.exists(index_file):
    try:
      with open(index_file) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise st.CorruptCheckpointError(f'{index_file}: unreadable index: {e!r}') from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
      raise CheckpointError(f'{index_file}: shard file(s) not found: {missing}')
    infos = {}
    for name in files:
      infos.update(st.read_header(os.path.join(path, name)))
    misplaced = sorted(
      k for k, f in weight_map.items() if k not in infos or os.path.basename(infos[k].file) != f
    )
    if misplaced:
      raise CheckpointError(
        f'{index_file}: keys not in the shard the index names: {misplaced[:20]}'
      )
    return infos
  if os.path.exists(single):
    return st.read_header(single)
  raise CheckpointError(f'{path}: neither {INDEX} nor {SINGLE} found')


def _check(cfg: ModelConfig, infos: dict[str, st.TensorInfo], path: str) -> None:
  expected = official_shapes(cfg)
  missing = sorted(set(expected) - set(infos))
  unexpected = sorted(set(infos) - set(expected))
  problems = []
  if missing:
    problems.append(f'missing keys ({len(missing)}): {missing}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {unexpected}')
  wrong = [
    (k, expected[k], infos[k].shape)
    for k in sorted(expected)
    if k in infos and tuple(infos[k].shape) != tuple(expected[k])
  ]
  if wrong:
    listed = '; '.join(f'{k}: expected {e}, found {f}' for k, e, f in wrong)
    problems.append(f'shape mismatch ({len(wrong)}): {listed}')
  if problems:
    raise CheckpointError(
      f'{path}: checkpoint does not match its config (config.json and the '
      f'weights disagree):\n  ' + '\n  '.join(problems)
    )


def _reader(group: list[Entry], shape: tuple[int, ...], infos, np_dtype):
  """A callback idx -> the numpy block of our stacked param, read tensor by tensor."""
  lead = len(group[0].index)
  by_index = {e.index: e for e in group}

  def read(idx):
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(tuple(idx)))
    ranges = [range(*idx[k].indices(shape[k])) for k in range(lead)]
    rest = idx[lead:]
    blocks = []
    for combo in itertools.product(*ranges):
      e = by_index[combo]
      blocks.append(e.from_torch(st.read_tensor(infos[e.key]), shape[lead:])[rest].astype(np_dtype))
    out = np.stack(blocks) if lead else blocks[0]
    return out.reshape([len(r) for r in ranges] + list(out.shape[1:] if lead else out.shape))

  return read


def check_official(path: str) -> tuple[ModelConfig, dict[str, st.TensorInfo]]:
  """(config, tensor index) of an official checkpoint, from config.json and the safetensors
  headers only (cheap: no weights read); CheckpointError names what is missing or mismatched."""
  config_file = os.path.join(path, 'config.json')
  problem = kinds.misplaced(path, (kinds.OFFICIAL,))  # a run, adapter or Mimi: say so
  if problem:
    raise CheckpointError(problem)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such checkpoint directory')
  if not os.path.exists(config_file):
    raise CheckpointError(
      f'{path}: config.json not found beside the weights; put the config.json '
      'of the same release (or of `flmjax export`) there'
    )
  cfg = ModelConfig.from_official(config_file)
  infos = _tensor_index(path)
  _check(cfg, infos, path)
  return cfg, infos


def load_official(
  path: str,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules=shd.RULES,
  tensor_parallel: int | None = None,
) -> FLMAudio:
  """Reads config.json + safetensors (single or sharded) into an FLMAudio.

  `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype too; both
  default to the checkpoint's. With a mesh, each device's block is read straight from disk into
  its sharding, one tensor at a time. The vocab and depth MLP are zero-padded for
  `tensor_parallel` (default: the mesh's tensor axis, else 1).
  """
  cfg, infos = check_official(path)
  dtype = dtype or cfg.checkpoint_dtype
  if tensor_parallel is None:
    tensor_parallel = mesh.shape.get('tensor', 1) if mesh is not None else 1
  cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype, tensor_parallel=tensor_parallel)
  graphdef, state = nnx.split(abstract(cfg))
  params = _flat_params(state)
  for p, group in _grouped(cfg).items():
    var = params[p]
    shape = var.get_value().shape
    read = _reader(group, shape, infos, _NP[cfg.param_dtype])
    if mesh is None:
      value = jax.numpy.asarray(read(()))
    else:
      sharding = shd.named_sharding(var.get_metadata()['axes'], shape, mesh, rules)
      value = jax.make_array_from_callback(shape, sharding, read)
    var.set_value(value)
  return nnx.merge(graphdef, state)


def _host(value: jax.Array) -> np.ndarray:
  if not getattr(value, 'is_fully_addressable', True):
    from jax.experimental import multihost_utils

    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


def save_official(
  model: FLMAudio,
  path: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  overwrite: bool = False,
  extra_files=None,
) -> str:
  """Writes config.json and HF-style safetensors in the official key layout, atomically.

  Everything goes to a temporary directory beside `path`, renamed into place at the end, so a
  crash never leaves a complete-looking checkpoint. With overwrite=True an existing `path` gets
  the new checkpoint files, loses its stale ones, and keeps every other file. `extra_files(dir)`
  may add files (the tokenizer) to the new checkpoint before it is moved into place. Holds one
  shard's tensors (at most `max_shard_bytes`) and one parameter on the host at a time.
  """
  cfg = model.cfg
  dtype = dtype or cfg.checkpoint_dtype
  if dtype not in _NP:
    raise ValueError(f'save_official: unknown dtype {dtype!r}; use one of {sorted(_NP)}')
  path = os.path.abspath(path)
  check_target(path, overwrite)
  np_dtype = _NP[dtype]
  params = _flat_params(nnx.state(model))
  all_entries = entries(cfg)
  shapes = official_shapes(cfg)
  shards, size = [[]], 0
  for e in all_entries:
    nbytes = np_dtype.itemsize * int(np.prod(shapes[e.key]))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  cached: dict = {}

  def produce(key):
    e = by_key[key]
    if cached.get('path') != e.path:  # one parameter gathered at a time
      cached.clear()
      cached.update(path=e.path, value=_host(params[e.path].get_value()))
    return e.to_torch(cached['value'][e.index]).astype(np_dtype)

  by_key = {e.key: e for e in all_entries}
  if jax.process_index() != 0:
    for e in all_entries:  # every host must join the gathers; only host 0 writes
      produce(e.key)
    return path
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
  try:
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(cfg.replace(checkpoint_dtype=dtype).to_official(), f, indent=2)
    names = (
      [SINGLE]
      if len(shards) == 1
      else [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
      specs = [(e.key, np_dtype, shapes[e.key]) for e in shard]
      total += st.write_file(os.path.join(tmp, name), specs, produce)
      weight_map.update({e.key: name for e in shard})
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX), 'w') as f:
        json.dump(
          {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))},
          f,
          indent=2,
        )
    if extra_files:
      extra_files(tmp)
    if os.path.exists(path):
      _replace_checkpoint_files(tmp, path)
    else:
      os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def _is_checkpoint_file(name: str) -> bool:
  return name in ('config.json', SINGLE, INDEX) or (
    name.startswith('model-') and name.endswith('.safetensors')
  )


def check_target(path: str, overwrite: bool) -> None:
  """A checkpoint goes into a new directory, or (with overwrite) replaces one's checkpoint files."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f'{path} is a file; give a directory for the checkpoint')
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace its checkpoint files')


def _replace_checkpoint_files(new: str, path: str) -> None:
  """Moves every file of `new` into the existing `path` (each os.replace is atomic), then removes
  the old checkpoint's files the new one did not rewrite (stale shards, index). Files that are not
  a checkpoint's (notes, tokenizer of another kind, anything else) stay."""
  names = sorted(os.listdir(new), key=lambda n: n == 'config.json')  # config.json last
  for name in names:
    os.replace(os.path.join(new, name), os.path.join(path, name))
  for name in os.listdir(path):
    if _is_checkpoint_file(name) and name not in names:
      os.remove(os.path.join(path, name))
