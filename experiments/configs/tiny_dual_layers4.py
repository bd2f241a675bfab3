"""Issue 29, arm 12 (experiments/RESULTS.md): the default (arm 8's H) with 4 backbone layers
instead of the tiny preset's 2."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'num_layers': 4, **kw})
