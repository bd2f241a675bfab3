"""Issue 29, arm 10 M (experiments/RESULTS.md): arm 10's L with whole turns in the duplex stage:
a conversation window trains no target before the first user turn that starts inside it
(SourceSpec.whole_turns), so no answer is trained with its question cut off."""

from flmjax.configs.tiny_dual import ARM8, recipe


def get_config(run_dir: str, **kw):
  return recipe(
    run_dir, **{**ARM8, 'barge_in_split': 'duplex_paused_quick_stop', 'whole_turns': True, **kw}
  )
