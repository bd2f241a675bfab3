"""Issue 29, arm 13 (experiments/RESULTS.md): the default (arm 8's H) with
1150 duplex steps and the duplex stage's peak learning rate at 6e-3 (both other arms' changes)."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(run_dir, **{**ARM8, 'steps': (100, 1150), 'peak_lr': (3e-3, 6e-3), **kw})
