"""Issue 29, arm 16 (experiments/RESULTS.md): arm 15's V (the default with 4000 conversations in
which every question is split right after its direction word) with the duplex stage's peak
learning rate at 8e-3 instead of 6e-3."""

from flmjax.configs.tiny_dual import ARM8, recipe

U = {**ARM8, 'steps': (100, 1000), 'peak_lr': (3e-3, 6e-3)}  # arm 14's U, the default


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**U, 'direction_pause': 1.0, 'peak_lr': (3e-3, 8e-3), **kw})
