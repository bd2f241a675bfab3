"""Issue 29, arm 7 F (experiments/RESULTS.md): arm 4's E (stage 1 in 32-frame windows) with 900
duplex steps, and barge-in-rich conversations (the corpus's extra 'duplex_barge_in' split) mixed
into the duplex stage at weight 0.5 beside the conversations' 1.0."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(run_dir, **{'asr_tts_window': 32, 'steps': (100, 900), 'barge_in': 0.5, **kw})
