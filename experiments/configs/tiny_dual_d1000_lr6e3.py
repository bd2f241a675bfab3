"""Issue 29, arm 14 (experiments/RESULTS.md): the default (arm 8's H) with 1000 duplex steps and
the duplex stage's peak learning rate at 6e-3: arm 13's T, shortened to fit 6 minutes."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'steps': (100, 1000), 'peak_lr': (3e-3, 6e-3), **kw})
