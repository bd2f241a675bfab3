"""Issue 29, arm 15 (experiments/RESULTS.md): the default (arm 14's U) with 4000 more
conversations in the duplex stage, at weight 1.0, in which every question is split by a pause
right after its 'after' or 'before' ('duplex_direction_pause')."""

from flmjax.configs.tiny_dual import ARM8, recipe

U = {**ARM8, 'steps': (100, 1000), 'peak_lr': (3e-3, 6e-3)}  # arm 14's U, the default


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**U, 'direction_pause': 1.0, **kw})
