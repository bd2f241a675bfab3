"""LoRA runs outside training: the adapters restored onto their base (checked by fingerprint),
merged into a plain model (export --merge, chat, serve, StreamingDecoder), or written as a PEFT
adapter named after the official PyTorch model's modules (export --adapters)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from flmjax.checkpoint import kinds
from flmjax.checkpoint import safetensors_io as st
from flmjax.checkpoint.layout import entries
from flmjax.config import ModelConfig
from flmjax.model import lora as lora_lib
from flmjax.model.flm import FLMAudio, abstract
from flmjax.train.checkpointing import Checkpointer, abstract_on_cpu
from flmjax.train.state import build_base, join

PEFT_CONFIG, PEFT_WEIGHTS = kinds.ADAPTER_CONFIG, kinds.ADAPTER_WEIGHTS
PEFT_PREFIX = 'base_model.model.'


class BaseMismatchError(ValueError):
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
    from flmjax.checkpoint import load_official

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
    params = jax.jit(lambda w: build_base(cfg, seed, lc.base_dtype, w))(weights)
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
  from flmjax.train.config import model_config_from_json

  lc = lora_config(meta)
  cfg = model_config_from_json(meta['model_config']).replace(dtype='float32', param_dtype='float32')
  graphdef, state = nnx.split(abstract(cfg, lc))
  _, a_adapters = lora_lib.split_params(nnx.to_pure_dict(state))
  adapters = ckpt.restore_params(abstract_on_cpu(a_adapters), step)
  params = restore_base(cfg, lc, meta, base)
  return nnx.merge(graphdef, join(params, adapters))


def peft_tensors(model: FLMAudio) -> dict[str, np.ndarray]:
  """The adapters of a LoRA model under PEFT's keys for the official module names: Linear
  `lora_A.weight` [r, in] and `lora_B.weight` [out, r]; Embedding `lora_embedding_A` [r, num]
  and `lora_embedding_B` [dim, r]. PEFT computes B @ A * alpha / r, which is our A @ B * scale
  transposed to torch's [out, in]; the layout padding is stripped."""
  lc, cfg = model.lora, model.cfg
  roles = {(m, n): r for m, n, r in lc.sites()}
  out = {}
  for e in entries(cfg):
    if e.path not in roles:
      continue
    owner = getattr(model, e.path[0])
    a = np.asarray(getattr(owner, f'{e.path[1]}_lora_a')[...], np.float32)[e.index]
    b = np.asarray(getattr(owner, f'{e.path[1]}_lora_b')[...], np.float32)[e.index]
    sliced = roles[e.path][len(e.index) :]  # the roles of one slice: i and o dims
    real = e.real or getattr(owner, e.path[1]).shape[len(e.index) :]
    ins = tuple(s for s, r in zip(real, sliced) if r == 'i')
    outs = tuple(s for s, r in zip(real, sliced) if r == 'o')
    a = a[tuple(slice(0, s) for s in ins)].reshape(-1, lc.rank)  # [in, r]
    b = b[(slice(None),) + tuple(slice(0, s) for s in outs)].reshape(lc.rank, -1)  # [r, out]
    module = PEFT_PREFIX + e.key.removesuffix('.weight')
    if e.kind == 'copy':  # an embedding table
      out[f'{module}.lora_embedding_A'], out[f'{module}.lora_embedding_B'] = a.T, b.T
    else:
      out[f'{module}.lora_A.weight'], out[f'{module}.lora_B.weight'] = a.T, b.T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_peft(model: FLMAudio, out_dir: str, base_name: str | None = None) -> str:
  """adapter_config.json + adapter_model.safetensors (float32) into `out_dir`."""
  lc = model.lora
  tensors = peft_tensors(model)
  modules = sorted({k[len(PEFT_PREFIX) :].rsplit('.lora_', 1)[0] for k in tensors})
  config = {
    'peft_type': 'LORA',
    'task_type': None,
    'base_model_name_or_path': base_name,
    'r': lc.rank,
    'lora_alpha': lc.alpha,
    'lora_dropout': lc.dropout,
    'target_modules': modules,
    'bias': 'none',
    'fan_in_fan_out': False,
    'init_lora_weights': True,
    'use_rslora': False,
    'use_dora': False,
    'modules_to_save': None,
    'inference_mode': True,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, PEFT_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  specs = [(k, v.dtype, v.shape) for k, v in sorted(tensors.items())]
  st.write_file(os.path.join(out_dir, PEFT_WEIGHTS), specs, lambda k: tensors[k])
  return out_dir
