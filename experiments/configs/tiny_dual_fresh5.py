"""Issue 29, arm 15 (experiments/RESULTS.md): arm 14's U (tiny_dual.ARM14) drawing its duplex stage
from 5 times as many conversations of each kind, in the same proportions, so that it sees each
about once instead of about 4.7 times."""

from flmjax.configs.tiny_dual import ARM14, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM14, 'fresh': 5, **kw})
