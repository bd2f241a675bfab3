"""`flmjax export CKPT_DIR OUT_DIR`: an orbax training checkpoint -> the official PyTorch layout."""
from __future__ import annotations

import os

from flax import nnx

from flmjax.model.flm import FLMAudio, abstract
from flmjax.train.checkpointing import Checkpointer, CheckpointMissingError, abstract_on_cpu
from flmjax.train.config import model_config_from_json


def checkpoint_dir(path: str) -> str:
  """Accepts a run directory or its checkpoints/ directory."""
  if not os.path.isdir(path):
    raise CheckpointMissingError(f'{path}: no such checkpoint directory')
  inner = os.path.join(path, 'checkpoints')
  return inner if os.path.isdir(inner) else path


def restore_model(ckpt_dir: str, step: int | None = None) -> tuple[FLMAudio, dict]:
  """The trained model (float32, on one CPU device) and the checkpoint's meta."""
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), use_async=False)
  try:
    meta = ckpt.restore_meta(step)
    cfg = model_config_from_json(meta['model_config']).replace(dtype='float32',
                                                               param_dtype='float32')
    graphdef, state = nnx.split(abstract(cfg))
    params = ckpt.restore_params(abstract_on_cpu(nnx.to_pure_dict(state)), step)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, params), meta


def export(ckpt_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False) -> str:
  from flmjax.checkpoint import save_official
  model, meta = restore_model(ckpt_dir, step)
  dtype = dtype or meta['model_config'].get('checkpoint_dtype', 'bfloat16')
  return save_official(model, out_dir, dtype=dtype, overwrite=overwrite)


def main(argv: list[str]) -> int:
  import argparse
  ap = argparse.ArgumentParser(prog='flmjax export',
                               description='orbax training checkpoint -> official safetensors')
  ap.add_argument('ckpt_dir', help='a run directory or its checkpoints/ directory')
  ap.add_argument('out_dir')
  ap.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  ap.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                  help="default: the model config's checkpoint_dtype")
  ap.add_argument('--overwrite', action='store_true')
  args = ap.parse_args(argv)
  try:
    path = export(args.ckpt_dir, args.out_dir, step=args.step, dtype=args.dtype,
                  overwrite=args.overwrite)
  except (CheckpointMissingError, OSError, ValueError) as e:
    print(f'flmjax export: {type(e).__name__}: {e}')
    return 1
  print(f'wrote {path}')
  return 0
