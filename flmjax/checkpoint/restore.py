"""A training run's checkpoint -> the trained model, for every reader (decode, serve, eval,
export): `restore_model` restores the orbax params of a full run, or a LoRA run's adapters onto
their base (an official checkpoint or the seed's initialisation, checked by fingerprint) and
merges them (flmjax.model.transforms)."""

from __future__ import annotations

import os

import jax
from etils import epath
from flax import nnx

from flmjax.checkpoint.checkpointer import (
  Checkpointer,
  CheckpointMissingError,
  abstract_on_cpu,
  drop_abandoned_reads,
  one_line,
)
from flmjax.checkpoint.official import load_official
from flmjax.checkpoint.safetensors_io import CorruptCheckpointError
from flmjax.checkpoint.storage import as_path, check_remote
from flmjax.config import ModelConfig, model_config_from_json
from flmjax.errors import FlmjaxError
from flmjax.model import lora as lora_lib
from flmjax.model import transforms
from flmjax.model.flm import FLMAudio, abstract


class BaseMismatchError(FlmjaxError, ValueError):
  """The base a LoRA run is restored onto is not the one its adapters were trained on."""


def lora_config(meta: dict) -> lora_lib.LoraConfig | None:
  """The LoraConfig of a checkpoint's meta, or None for a full fine-tune."""
  d = meta.get('lora')
  if d is None:
    return None
  return lora_lib.LoraConfig(
    **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != '__type__'}
  )


def base_source(meta: dict, base: str | None = None) -> str | None:
  """Where a LoRA run's base comes from: `base` (an official checkpoint directory), else the
  run's init_from; None means the run's seed initialised it."""
  return base or (meta.get('train_config') or {}).get('init_from')


def restore_base(
  cfg: ModelConfig, lc: lora_lib.LoraConfig, meta: dict, base: str | None = None
) -> dict:
  """The frozen base as the run stored it (on one CPU device), checked against the run's
  fingerprint. cfg: the checkpoint's model config (its padding), float32."""
  source = base_source(meta, base)
  if source:
    if not os.path.isdir(source):
      raise FileNotFoundError(
        f"the LoRA run's base {source} is not there; pass --base DIR (the "
        'official checkpoint it was trained on)'
      )
    dtype = 'float32' if lc.base_dtype == 'float32' else 'bfloat16'
    model = load_official(source, dtype=dtype, tensor_parallel=cfg.tensor_parallel)
    weights = nnx.to_pure_dict(nnx.state(model))
  else:
    weights = None
  seed = int((meta.get('train_config') or {}).get('seed', 0))
  with jax.default_device(jax.devices('cpu')[0]):  # jitted, as training builds it
    params = jax.jit(lambda w: transforms.build_base(cfg, seed, lc.base_dtype, w))(weights)
  got, want = lora_lib.fingerprint(cfg, lc.base_dtype, params), meta.get('base_fingerprint')
  if got != want:
    raise BaseMismatchError(
      f"the base {source or 'from the seed'} is not the one this run's adapters were trained "
      f"on (fingerprint {got[:12]}, the run's {str(want)[:12]}); pass --base DIR with the "
      'official checkpoint the run used'
    )
  return params


def restore_lora_model(
  ckpt: Checkpointer, step: int, meta: dict, base: str | None = None
) -> FLMAudio:
  """A LoRA run's model, unmerged (base + adapters, float32 compute), on one CPU device."""
  lc = lora_config(meta)
  cfg = model_config_from_json(meta['model_config']).replace(dtype='float32', param_dtype='float32')
  graphdef, state = nnx.split(abstract(cfg, lc))
  _, a_adapters = lora_lib.split_params(nnx.to_pure_dict(state))
  adapters = ckpt.restore_params(abstract_on_cpu(a_adapters), step)
  params = restore_base(cfg, lc, meta, base)
  return nnx.merge(graphdef, transforms.join(params, adapters))


def checkpoint_dir(path: str) -> epath.Path:
  """Accepts a run directory or its checkpoints/ directory (local or gs://), written by any
  number of processes: one process reads it whole."""
  check_remote(path)
  path = as_path(path)
  if not path.is_dir():
    raise CheckpointMissingError(f'{path}: no such checkpoint directory')
  inner = path / 'checkpoints'
  if inner.is_dir():
    return inner
  if (path / 'config.json').is_file():
    raise CheckpointMissingError(
      f'{path} is an official checkpoint already (config.json); give '
      'a training run directory (RUN_DIR or RUN_DIR/checkpoints)'
    )
  if not any(p.name.isdigit() for p in path.iterdir()):
    raise CheckpointMissingError(
      f'{path}: no training checkpoints here; give a training run '
      'directory (RUN_DIR or RUN_DIR/checkpoints)'
    )
  return path


def restore_model(
  ckpt_dir: str, step: int | None = None, *, base: str | None = None, merge: bool = True
) -> tuple[FLMAudio, dict]:
  """The trained model (float32, on one CPU device) and the checkpoint's meta. A LoRA run's
  adapters are restored onto their base (`base`, else the run's init_from or seed; checked by
  fingerprint) and merged into it, unless merge=False."""
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), use_async=False)
  try:
    step = ckpt.latest_step() if step is None else step
    try:
      meta = ckpt.restore_meta(step)
      if meta.get('lora') is not None:
        model = restore_lora_model(ckpt, step, meta, base)
        return (transforms.merge(model) if merge else model), meta
      cfg = model_config_from_json(meta['model_config']).replace(
        dtype='float32', param_dtype='float32'
      )
      graphdef, state = nnx.split(abstract(cfg))
      params = ckpt.restore_params(abstract_on_cpu(nnx.to_pure_dict(state)), step)
    except (CheckpointMissingError, BaseMismatchError, FileNotFoundError):
      raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      drop_abandoned_reads()
      others = [s for s in ckpt.all_steps() if s != step]
      raise CorruptCheckpointError(
        f'{ckpt.directory}: checkpoint step {step} is unreadable (corrupt or incomplete: '
        f'{one_line(e)}); '
        + (f'try --step with one of {others}' if others else 'no other step to fall back to')
      ) from None
  finally:
    ckpt.close()
  return nnx.merge(graphdef, params), meta


def require_lora(ckpt_dir: str, step: int | None, flag: str) -> None:
  """Raises a one-line ValueError naming `flag` when the run is no LoRA run."""
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), use_async=False)
  try:
    meta = ckpt.restore_meta(step)
  finally:
    ckpt.close()
  if meta.get('lora') is None:
    raise ValueError(f'{flag}: {ckpt_dir} is a full fine-tune, not a LoRA run; drop {flag}')
