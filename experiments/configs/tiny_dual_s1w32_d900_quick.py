"""Issue 29, arm 8 H (experiments/RESULTS.md): arm 7's F with its barge-in-rich conversations
made by a model that falls silent one frame after a barge-in starts (the corpus's extra
'duplex_quick_stop' split), at weight 0.5 in the duplex stage."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(
    run_dir,
    **{
      'asr_tts_window': 32,
      'steps': (100, 900),
      'barge_in': 0.5,
      'barge_in_split': 'duplex_quick_stop',
      **kw,
    },
  )
