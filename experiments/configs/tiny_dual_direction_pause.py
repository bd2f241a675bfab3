"""Issue 29, arm 15 (experiments/RESULTS.md): arm 14's U (tiny_dual.ARM14) with 4000 more
conversations in the duplex stage, at weight 1.0, in which every question is split by a pause
right after its 'after' or 'before' ('duplex_direction_pause')."""

from flmjax.configs.tiny_dual import ARM14, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM14, 'direction_pause': 1.0, **kw})
