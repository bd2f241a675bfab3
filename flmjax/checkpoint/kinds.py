"""What a path a user gives as a checkpoint holds, told from names and small headers (no weights
read), so a flag given the wrong kind says what it got and where that goes instead of failing
on a field of the wrong format (`misplaced`)."""

from __future__ import annotations

import json
import os

from flmjax.checkpoint import safetensors_io as st

# The kinds `identify` tells apart.
OFFICIAL = 'official'  # FLM-Audio, official layout: config.json + model*.safetensors
MIMI = 'mimi'  # the Mimi codec: one .safetensors (+ the config.json of a reduced one)
ADAPTER = 'adapter'  # a PEFT LoRA adapter (`flmjax export --adapters`)
RUN = 'run'  # a training run (orbax steps), full fine-tune
LORA_RUN = 'lora_run'  # a training run of LoRA adapters on a frozen base
# The top-level modules of Mimi's state dict (golden/mimi/manifest.json); FLM-Audio's are model.*
# and aud_output_layers.*, lm_head.
MIMI_MODULES = (
  'encoder',
  'decoder',
  'encoder_transformer',
  'decoder_transformer',
  'quantizer',
  'downsample',
  'upsample',
)
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def _json(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def _mimi_weights(path: str) -> bool:
  try:
    keys = st.read_header(path)
  except (OSError, ValueError):
    return False
  return bool(keys) and all(k.split('.', 1)[0] in MIMI_MODULES for k in keys)


def _run_steps(path: str) -> str | None:
  """The orbax steps folder of a run directory (RUN or RUN/checkpoints), else None."""
  inner = os.path.join(path, 'checkpoints')
  for folder in (inner, path) if os.path.isdir(inner) else (path,):
    if any(n.isdigit() and os.path.isdir(os.path.join(folder, n)) for n in os.listdir(folder)):
      return folder
  return None


def _is_lora_run(steps: str) -> bool:
  """From the newest step's meta JSON (flmjax.checkpoint.checkpointer writes it)."""
  for step in sorted((n for n in os.listdir(steps) if n.isdigit()), key=int, reverse=True):
    meta = _json(os.path.join(steps, step, 'meta', 'metadata'))
    if meta is not None:
      return meta.get('lora') is not None
  return False


def identify(path: str | os.PathLike) -> str | None:
  """One of the kinds above, or None when the path holds none of them (or does not exist)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    if os.path.basename(path) == ADAPTER_WEIGHTS:
      return ADAPTER
    return MIMI if path.endswith('.safetensors') and _mimi_weights(path) else None
  if not os.path.isdir(path):
    return None
  names = os.listdir(path)
  if ADAPTER_CONFIG in names:
    return ADAPTER
  config = _json(os.path.join(path, 'config.json')) if 'config.json' in names else None
  if config is not None and 'seanet' in config:
    return MIMI
  if config is not None and ('aud_depthgpt' in config or config.get('model_type') == 'FLMAudio'):
    return OFFICIAL
  weights = [n for n in names if n.endswith('.safetensors')]
  if len(weights) == 1 and _mimi_weights(os.path.join(path, weights[0])):
    return MIMI
  steps = _run_steps(path)
  if steps is not None:
    return LORA_RUN if _is_lora_run(steps) else RUN
  return None


def _adapter_base(path: str) -> str:
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  base = (_json(os.path.join(folder, ADAPTER_CONFIG)) or {}).get('base_model_name_or_path')
  return f' ({base})' if isinstance(base, str) and base else ''


def misplaced(
  path: str | os.PathLike, accepts: tuple[str, ...], *, mimi_flag: str | None = None
) -> str | None:
  """None when `path` is of a kind in `accepts` (or of no kind told here: the loader's own checks
  speak then); else `PATH is <what it is>; <what to do>`, to follow the flag's name."""
  path = os.fspath(path)
  kind = identify(path)
  if kind is None or kind in accepts:
    return None
  if kind == MIMI:
    where = f'pass it as {mimi_flag}, and here ' if mimi_flag else 'here give '
    model = 'config.json + model.safetensors' + (', or a training run' if RUN in accepts else '')
    return (
      f'{path} is a Mimi codec checkpoint (the audio tokenizer), not an FLM-Audio model; '
      f'{where}the model ({model})'
    )
  if kind == ADAPTER:
    return (
      f'{path} is a LoRA adapter (PEFT, from `flmjax export --adapters`), not a whole model; '
      'give the LoRA training run it came from, or merge it into its base once: '
      '`flmjax export --merge RUN_DIR OUT_DIR` and give OUT_DIR (PyTorch: load it onto '
      f'its base model{_adapter_base(path)} with peft)'
    )
  if kind == LORA_RUN:
    return (
      f'{path} is a LoRA training run, not an official checkpoint; merge it into its base '
      f'first: `flmjax export --merge {path} OUT_DIR`, then give OUT_DIR'
    )
  if kind == RUN:
    return (
      f'{path} is a training run, not an official checkpoint; export it first: '
      f'`flmjax export {path} OUT_DIR`, then give OUT_DIR'
    )
  return (  # OFFICIAL where a Mimi codec is wanted
    f'{path} is an FLM-Audio model checkpoint, not the Mimi codec; give it as --checkpoint, '
    'and as the codec the Mimi .safetensors (or its folder)'
  )
