"""Issue 29, arm 3 C (experiments/RESULTS.md): tiny_dual.py with stage 1 in 32-frame windows
(every single-speaker grid, at most 29 columns, fits one whole, so stage 1 trains the same
targets at half the cost) and the CPU this saves spent on a longer duplex stage: 700 steps
instead of 650."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'asr_tts_window': 32, 'steps': (100, 700), **kw})
