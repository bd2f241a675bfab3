"""Evaluation: what a trained model does on held-out data, as a full-duplex talker too:
turn-taking metrics, speech activity, held-out streaming."""

from flmjax.eval.activity import THRESHOLD_DBFS, speech_activity
from flmjax.eval.turn_taking import EVENT_KINDS, events_from_segments, turn_taking

__all__ = [
  'EVENT_KINDS',
  'THRESHOLD_DBFS',
  'events_from_segments',
  'speech_activity',
  'turn_taking',
]
