"""A LoRA model's adapters as a PEFT adapter (`flmjax export --adapters`): adapter_config.json and
adapter_model.safetensors, named after the official PyTorch model's modules. Restoring a LoRA
run onto its base is flmjax.checkpoint.restore."""

from __future__ import annotations

import json
import os

import numpy as np

from flmjax.checkpoint import kinds
from flmjax.checkpoint import safetensors_io as st
from flmjax.checkpoint.layout import entries
from flmjax.model.flm import FLMAudio

PEFT_CONFIG, PEFT_WEIGHTS = kinds.ADAPTER_CONFIG, kinds.ADAPTER_WEIGHTS
PEFT_PREFIX = 'base_model.model.'


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
