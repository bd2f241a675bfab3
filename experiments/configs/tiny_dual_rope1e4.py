"""Issue 29, arm 11 (experiments/RESULTS.md): the default (arm 8's H) with the tiny model's RoPE
base at 1e4 instead of the preset's 1e6."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'rope_theta': 1e4, **kw})
