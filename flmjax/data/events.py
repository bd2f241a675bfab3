"""A conversation's turn-taking events, from its manifest segments: what the synthetic corpus
writes beside its segments and what evaluation scores (flmjax.eval.turn_taking).

Events are `(kind, start_frame, end_frame)`:
- 'turn_end': the user's turn ends at start; end is the user's next speech onset (or F);
- 'pause': a pause inside a user turn, frames [start, end): the model should stay silent;
- 'interrupt': the user starts speaking at start while the model speaks; end is the end of that
  user speech: the model should stop and yield.
"""

from __future__ import annotations

from collections.abc import Sequence

from flmjax.codec.base import FRAME_RATE  # 12.5 Hz: one frame is 80 ms

EVENT_KINDS = ('turn_end', 'pause', 'interrupt')


def seconds_to_frame(t: float, frame_rate: float = FRAME_RATE) -> int:
  """As the data pipeline does it (docs/data.md): round(t * 12.5)."""
  return int(round(float(t) * frame_rate))


def events_from_segments(
  segments: Sequence[dict], num_frames: int, frame_rate: float = FRAME_RATE
) -> list[tuple[str, int, int]]:
  """A conversation's events from its manifest segments ({'speaker', 'start', 'end'} in seconds).

  The end of a user segment is a 'pause' when the user's next segment starts before any model
  segment does, and a 'turn_end' otherwise (end_frame: the user's next onset, or num_frames). A
  user segment that starts while a model segment is under way is an 'interrupt' (end_frame: the end
  of that user segment). Sorted by start frame.
  """
  frame = lambda t: seconds_to_frame(t, frame_rate)
  spans = sorted((frame(s['start']), frame(s['end']), s['speaker']) for s in segments)
  user = [(a, b) for a, b, who in spans if who == 'user']
  model = [(a, b) for a, b, who in spans if who == 'model']
  events = []
  for i, (start, end) in enumerate(user):
    if any(a <= start < b for a, b in model):
      events.append(('interrupt', start, end))
    following = user[i + 1][0] if i + 1 < len(user) else num_frames
    model_between = any(end <= a < following for a, _ in model)
    if i + 1 < len(user) and not model_between:
      if following > end:  # abutting segments are one stretch of speech: no event
        events.append(('pause', end, following))
    else:
      events.append(('turn_end', end, max(end, following)))
  return sorted(events, key=lambda e: (e[1], e[0]))
