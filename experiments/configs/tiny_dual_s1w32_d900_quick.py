"""Issue 29, arm 8 H (experiments/RESULTS.md): arm 7's F with its barge-in-rich conversations
made by a model that falls silent one frame after a barge-in starts (the corpus's extra
'duplex_quick_stop' split), at weight 0.5 in the duplex stage."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, **kw})
