"""Issue 29, arm 13 (experiments/RESULTS.md): the default (arm 8's H) with
the duplex stage's peak learning rate at 6e-3 instead of 4e-3."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'peak_lr': (3e-3, 6e-3), **kw})
