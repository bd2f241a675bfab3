"""Issue 29, arm 3 D (experiments/RESULTS.md): tiny_dual_s1w32.py (stage 1 in 32-frame windows,
700 duplex steps) with the duplex stage's peak learning rate halved, 4e-3 -> 2e-3 (stage 1 keeps
3e-3): in the control the answers were learnt only once the cosine had brought the lr below
about 2.5e-3."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(
    run_dir, **{'asr_tts_window': 32, 'steps': (100, 700), 'peak_lr': (3e-3, 2e-3), **kw}
  )
