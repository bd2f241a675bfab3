"""Issue 29, arm 2 (experiments/RESULTS.md): tiny_dual.py with tiny_dual_w128's windows and the
duplex stage's text-stream loss doubled (words and WAIT alike, so their balance is kept)."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'window': 128, 'batch_size': 16, 'duplex_text_weight': 2.0, **kw})
