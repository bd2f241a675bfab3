"""Issue 29, arm 2 (experiments/RESULTS.md): tiny_dual.py with whole conversations in a window:
128-frame windows, 16 per step (the same frames per step as 64 x 32)."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'window': 128, 'batch_size': 16, **kw})
