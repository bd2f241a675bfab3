"""Issue 29, arm 15 (experiments/RESULTS.md): the default (arm 14's U) drawing its duplex stage
from 5 times as many conversations of each kind, in the same proportions, so that it sees each
about once instead of about 4.7 times."""

from flmjax.configs.tiny_dual import ARM8, recipe

U = {**ARM8, 'steps': (100, 1000), 'peak_lr': (3e-3, 6e-3)}  # arm 14's U, the default


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**U, 'fresh': 5, **kw})
