"""Issue 29, arm 9 J (experiments/RESULTS.md): the default (arm 8's H) with its quick-stop
conversations at weight 0.25 instead of 0.5 in the duplex stage."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'barge_in': 0.25, **kw})
