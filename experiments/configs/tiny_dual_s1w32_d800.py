"""Issue 29, arm 4 E (experiments/RESULTS.md): tiny_dual.py with stage 1 in 32-frame windows (the
same targets as 64-frame windows at half the cost, arm 3) and a duplex stage of 800 steps
instead of 650, sized to keep `flmjax main` with its set-up inside 6 minutes on the quiet box."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'asr_tts_window': 32, 'steps': (100, 800), **kw})
