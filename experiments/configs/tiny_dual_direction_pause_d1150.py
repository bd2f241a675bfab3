"""Issue 29, arm 16 (experiments/RESULTS.md): arm 15's V (arm 14's U with 4000 conversations in
which every question is split right after its direction word) with 1150 duplex steps, as arm
13's T."""

from flmjax.configs.tiny_dual import ARM14, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM14, 'direction_pause': 1.0, 'steps': (100, 1150), **kw})
