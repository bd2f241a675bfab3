"""An orbax training checkpoint -> the official PyTorch layout with the run's tokenizer files
beside the weights (`export`, behind `flmjax export`). A LoRA run is merged into its base, or
written as a PEFT adapter (peft=True). Restoring the model is flmjax.checkpoint.restore."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from etils import epath

from flmjax.checkpoint import peft as peft_lib
from flmjax.checkpoint.restore import base_source, restore_model

# Files a Hugging Face tokenizer directory may hold beside tokenizer.json: copied along with it.
HF_TOKENIZER_FILES = (
  'tokenizer_config.json',
  'special_tokens_map.json',
  'vocab.json',
  'merges.txt',
  'added_tokens.json',
)


# One line, on `export --adapters` of a run whose frozen base is int8 (docs/training.md).
INT8_PEFT_WARNING = (
  "warning: this run's adapters were trained on an int8 base; PEFT applies them to the "
  "full-precision official base, which differs from flmjax's int8-base model (measured: 0.049 "
  'text and 0.237 depth logits apart); only --merge reproduces it'
)


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
    return peft_lib.write_peft(model, out_dir, base_source(meta, base))
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
      f'`out` {out} exists; pass `overwrite` to replace its checkpoint '
      'files (other files in it are kept)'
    )
  with tempfile.TemporaryDirectory() as tmp:
    local = export(ckpt_dir, os.path.join(tmp, 'export'), **{**kw, 'overwrite': False})
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
      epath.Path(local, name).copy(out / name, overwrite=True)
  return os.fspath(out)
