"""Issue 29, arm 12 (experiments/RESULTS.md): the default (arm 8's H) with 3 backbone layers
instead of the tiny preset's 2."""

from flmjax.configs.tiny_dual import get_config as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'num_layers': 3, **kw})
