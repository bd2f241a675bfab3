"""An orbax training checkpoint -> the trained model (`restore_model`), or the official PyTorch
layout with the run's tokenizer files beside the weights (`export`, behind `flmjax export`). A
LoRA run is merged into its base, or written as a PEFT adapter (peft=True)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from etils import epath
from flax import nnx

from flmjax.checkpoint.safetensors_io import CorruptCheckpointError
from flmjax.model import lora
from flmjax.model.flm import FLMAudio, abstract
from flmjax.train import adapters
from flmjax.train.checkpointing import (
  Checkpointer,
  CheckpointMissingError,
  abstract_on_cpu,
  drop_abandoned_reads,
  one_line,
)
from flmjax.train.config import model_config_from_json
from flmjax.train.storage import as_path, check_remote

# Files a Hugging Face tokenizer directory may hold beside tokenizer.json: copied along with it.
HF_TOKENIZER_FILES = (
  'tokenizer_config.json',
  'special_tokens_map.json',
  'vocab.json',
  'merges.txt',
  'added_tokens.json',
)


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


# One line, on `export --adapters` of a run whose frozen base is int8 (docs/training.md).
INT8_PEFT_WARNING = (
  "warning: this run's adapters were trained on an int8 base; PEFT applies them to the "
  "full-precision official base, which differs from flmjax's int8-base model (measured: 0.049 "
  'text and 0.237 depth logits apart); only --merge reproduces it'
)


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
        model = adapters.restore_lora_model(ckpt, step, meta, base)
        return (lora.merge(model) if merge else model), meta
      cfg = model_config_from_json(meta['model_config']).replace(
        dtype='float32', param_dtype='float32'
      )
      graphdef, state = nnx.split(abstract(cfg))
      params = ckpt.restore_params(abstract_on_cpu(nnx.to_pure_dict(state)), step)
    except (CheckpointMissingError, adapters.BaseMismatchError, FileNotFoundError):
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


def copy_tokenizer(tokenizer: str, out_dir: str) -> list[str]:
  """Copies a tokenizer.json (with its Hugging Face siblings) or a SentencePiece .model (as
  tokenizer.model) into `out_dir`; returns the names written."""
  if tokenizer.endswith('.json'):
    names = {tokenizer: 'tokenizer.json'}
    src = os.path.dirname(tokenizer)
    names.update(
      {os.path.join(src, n): n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))}
    )
  else:
    names = {tokenizer: 'tokenizer.model'}
  for src, name in names.items():
    shutil.copyfile(src, os.path.join(out_dir, name))
  if tokenizer.endswith('.json') and 'tokenizer_config.json' not in names.values():
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:  # AutoTokenizer's entry
      json.dump({'tokenizer_class': 'PreTrainedTokenizerFast'}, f, indent=2)
  return sorted(os.listdir(out_dir))


def export(
  ckpt_dir: str,
  out_dir: str,
  *,
  step: int | None = None,
  dtype: str | None = None,
  overwrite: bool = False,
  peft: bool = False,
  base: str | None = None,
  log=print,
) -> str:
  """The official layout (a LoRA run merged into its base), or with peft=True a LoRA run's
  PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
  from flmjax.checkpoint import save_official
  from flmjax.checkpoint.official import check_target

  if '://' in out_dir:  # a bucket: export locally, then copy each file up
    return _export_remote(
      ckpt_dir,
      epath.Path(out_dir),
      step=step,
      dtype=dtype,
      overwrite=overwrite,
      peft=peft,
      base=base,
      log=log,
    )
  check_target(os.path.abspath(out_dir), overwrite)  # before the (slow) restore
  model, meta = restore_model(ckpt_dir, step, base=base, merge=not peft)
  if peft:
    if model.lora.base_dtype == 'int8':
      log(INT8_PEFT_WARNING, file=sys.stderr)
    return adapters.write_peft(model, out_dir, adapters.base_source(meta, base))
  dtype = dtype or meta['model_config'].get('checkpoint_dtype', 'bfloat16')
  tokenizer = (meta.get('train_config') or {}).get('tokenizer')
  if tokenizer and not os.path.isfile(tokenizer):
    log(
      f"warning: the run's tokenizer {tokenizer} is gone; exporting the weights without it",
      file=sys.stderr,
    )
    tokenizer = None
  extra = (lambda d: copy_tokenizer(tokenizer, d)) if tokenizer else None
  return save_official(model, out_dir, dtype=dtype, overwrite=overwrite, extra_files=extra)


def _export_remote(ckpt_dir: str, out: epath.Path, **kw) -> str:
  if out.exists() and not kw['overwrite']:
    raise FileExistsError(
      f'OUT_DIR {out} exists; pass --overwrite to replace its checkpoint '
      'files (other files in it are kept)'
    )
  with tempfile.TemporaryDirectory() as tmp:
    local = export(ckpt_dir, os.path.join(tmp, 'export'), **{**kw, 'overwrite': False})
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
      epath.Path(local, name).copy(out / name, overwrite=True)
  return os.fspath(out)


def require_lora(ckpt_dir: str, step: int | None, flag: str) -> None:
  """Raises a one-line ValueError naming `flag` when the run is no LoRA run."""
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), use_async=False)
  try:
    meta = ckpt.restore_meta(step)
  finally:
    ckpt.close()
  if meta.get('lora') is None:
    raise ValueError(f'{flag}: {ckpt_dir} is a full fine-tune, not a LoRA run; drop {flag}')
