"""`flmjax export CKPT_DIR OUT_DIR`: an orbax training checkpoint -> the official PyTorch layout,
with the run's tokenizer files beside the weights when the run names its tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from etils import epath
from flax import nnx

from flmjax.cli import ArgumentParser, command
from flmjax.model.flm import FLMAudio, abstract
from flmjax.train.checkpointing import (Checkpointer, CheckpointMissingError, abstract_on_cpu,
                                        as_path)
from flmjax.train.config import model_config_from_json

# Files a Hugging Face tokenizer directory may hold beside tokenizer.json: copied along with it.
HF_TOKENIZER_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'vocab.json',
                      'merges.txt', 'added_tokens.json')


class CorruptCheckpointError(ValueError):
  """A training checkpoint exists but cannot be read."""


def checkpoint_dir(path: str) -> epath.Path:
  """Accepts a run directory or its checkpoints/ directory (local or gs://), written by any
  number of processes: one process reads it whole."""
  path = as_path(path)
  if not path.is_dir():
    raise CheckpointMissingError(f'{path}: no such checkpoint directory')
  inner = path / 'checkpoints'
  if inner.is_dir():
    return inner
  if (path / 'config.json').is_file():
    raise CheckpointMissingError(f'{path} is an official checkpoint already (config.json); give '
                                 'a training run directory (RUN_DIR or RUN_DIR/checkpoints)')
  if not any(p.name.isdigit() for p in path.iterdir()):
    raise CheckpointMissingError(f'{path}: no training checkpoints here; give a training run '
                                 'directory (RUN_DIR or RUN_DIR/checkpoints)')
  return path


def restore_model(ckpt_dir: str, step: int | None = None) -> tuple[FLMAudio, dict]:
  """The trained model (float32, on one CPU device) and the checkpoint's meta."""
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), use_async=False)
  try:
    step = ckpt.latest_step() if step is None else step
    try:
      meta = ckpt.restore_meta(step)
      cfg = model_config_from_json(meta['model_config']).replace(dtype='float32',
                                                                 param_dtype='float32')
      graphdef, state = nnx.split(abstract(cfg))
      params = ckpt.restore_params(abstract_on_cpu(nnx.to_pure_dict(state)), step)
    except CheckpointMissingError:
      raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      others = [s for s in ckpt.all_steps() if s != step]
      raise CorruptCheckpointError(
          f'{ckpt.directory}: checkpoint step {step} is unreadable (corrupt or incomplete: '
          f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
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
    names.update({os.path.join(src, n): n for n in HF_TOKENIZER_FILES
                  if os.path.isfile(os.path.join(src, n))})
  else:
    names = {tokenizer: 'tokenizer.model'}
  for src, name in names.items():
    shutil.copyfile(src, os.path.join(out_dir, name))
  if tokenizer.endswith('.json') and 'tokenizer_config.json' not in names.values():
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:  # AutoTokenizer's entry
      json.dump({'tokenizer_class': 'PreTrainedTokenizerFast'}, f, indent=2)
  return sorted(os.listdir(out_dir))


def export(ckpt_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False, log=print) -> str:
  from flmjax.checkpoint import save_official
  from flmjax.checkpoint.official import check_target
  if '://' in out_dir:  # a bucket: export locally, then copy each file up
    return _export_remote(ckpt_dir, epath.Path(out_dir), step=step, dtype=dtype,
                          overwrite=overwrite, log=log)
  check_target(os.path.abspath(out_dir), overwrite)  # before the (slow) restore
  model, meta = restore_model(ckpt_dir, step)
  dtype = dtype or meta['model_config'].get('checkpoint_dtype', 'bfloat16')
  tokenizer = (meta.get('train_config') or {}).get('tokenizer')
  if tokenizer and not os.path.isfile(tokenizer):
    log(f'warning: the run\'s tokenizer {tokenizer} is gone; exporting the weights without it',
        file=sys.stderr)
    tokenizer = None
  extra = (lambda d: copy_tokenizer(tokenizer, d)) if tokenizer else None
  return save_official(model, out_dir, dtype=dtype, overwrite=overwrite, extra_files=extra)


def _export_remote(ckpt_dir: str, out: epath.Path, **kw) -> str:
  if out.exists() and not kw['overwrite']:
    raise FileExistsError(f'OUT_DIR {out} exists; pass --overwrite to replace its checkpoint '
                          'files (other files in it are kept)')
  with tempfile.TemporaryDirectory() as tmp:
    local = export(ckpt_dir, os.path.join(tmp, 'export'), **{**kw, 'overwrite': False})
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
      epath.Path(local, name).copy(out / name, overwrite=True)
  return os.fspath(out)


@command('flmjax export')
def main(argv: list[str]) -> int:
  ap = ArgumentParser(prog='flmjax export',
                      description='orbax training checkpoint -> official safetensors')
  ap.add_argument('ckpt_dir', help='a run directory or its checkpoints/ directory')
  ap.add_argument('out_dir')
  ap.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  ap.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                  help="default: the model config's checkpoint_dtype")
  ap.add_argument('--overwrite', action='store_true',
                  help="replace OUT_DIR's checkpoint files (other files in it are kept)")
  args = ap.parse_args(argv)
  checkpoint_dir(args.ckpt_dir)  # the input first, then where it goes
  if '://' in args.out_dir:
    path = export(args.ckpt_dir, args.out_dir, step=args.step, dtype=args.dtype,
                  overwrite=args.overwrite)
    print(f'wrote {path}: {", ".join(sorted(p.name for p in epath.Path(path).iterdir()))}')
    return 0
  out_dir = os.path.abspath(args.out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'OUT_DIR {args.out_dir} is a file; give a directory')
  if os.path.exists(out_dir) and not args.overwrite:
    raise FileExistsError(f'OUT_DIR {args.out_dir} exists; pass --overwrite to replace its '
                          'checkpoint files (other files in it are kept)')
  path = export(args.ckpt_dir, out_dir, step=args.step, dtype=args.dtype,
                overwrite=args.overwrite)
  print(f'wrote {path}: {", ".join(sorted(os.listdir(path)))}')
  return 0
