"""Issue 29, arm 7 G (experiments/RESULTS.md): arm 7's F plus question-and-answer monologues (the
corpus's extra 'tts_asr_qa' split) as single-speaker data at half the weight of each
single-speaker source, in both stages."""

from flmjax.configs.tiny_dual import recipe as _default


def get_config(run_dir: str, **kw):
  return _default(
    run_dir, **{'asr_tts_window': 32, 'steps': (100, 900), 'barge_in': 0.5, 'qa': 0.5, **kw}
  )
