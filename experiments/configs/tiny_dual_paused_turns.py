"""Issue 29, arm 10 M (experiments/RESULTS.md): arm 10's L with whole turns in the duplex stage:
a conversation window trains no target before the first user turn that starts inside it
(SourceSpec.whole_turns), so no answer is trained with its question cut off."""

from flmjax.configs.tiny_dual import get_config as _default


def get_config(run_dir: str, **kw):
  return _default(
    run_dir, **{'barge_in_split': 'duplex_paused_quick_stop', 'whole_turns': True, **kw}
  )
