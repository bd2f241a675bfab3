"""Issue 29, arm 10 L (experiments/RESULTS.md): the default (arm 8's H) with its quick-stop
conversations drawn with every question split by a pause (the corpus's extra
'duplex_paused_quick_stop' split, in place of 'duplex_quick_stop', at the same weight 0.5)."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'barge_in_split': 'duplex_paused_quick_stop', **kw})
