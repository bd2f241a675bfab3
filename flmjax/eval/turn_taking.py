"""Turn-taking metrics of a full-duplex talker, from its speech activity and the user's timeline.

Events are `(kind, start_frame, end_frame)`:
- 'turn_end': the user's turn ends at start; end is the user's next speech onset (or F);
- 'pause': a pause inside a user turn, frames [start, end): the model should stay silent;
- 'interrupt': the user starts speaking at start while the model speaks; end is the end of that
  user speech: the model should stop and yield.
`events_from_segments` (flmjax.data.events) derives them from a manifest's segments, as the
synthetic corpus writes them; `turn_taking` scores them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from flmjax.codec.base import FRAME_RATE  # 12.5 Hz: one frame is 80 ms
from flmjax.data.events import EVENT_KINDS
from flmjax.data.events import events_from_segments as events_from_segments  # re-exported
from flmjax.data.events import seconds_to_frame as seconds_to_frame  # re-exported

RULES = ('flmjax', 'fdb')
# Full-Duplex-Bench's takeover rule (v1_v1.5/evaluation/eval_smooth_turn_taking.py and
# eval_pause_handling.py in github.com/DanielLin94144/Full-Duplex-Bench): a reply whose words
# span less than 1 s (first word's start to last word's end) with 3 words or fewer is no takeover.
FDB_MIN_SECONDS, FDB_MAX_SHORT_WORDS = 1.0, 3


def _median(values: list[float]) -> float | None:
  return float(np.median(values)) if values else None


def latency_summary(latencies: list[float], prefix: str = 'response_latency_ms') -> dict:
  """The median (prefix), mean, p10 and p90 of a list of latencies; None for an empty list."""
  has = bool(latencies)
  pct = lambda q: float(np.percentile(latencies, q)) if has else None
  return {
    prefix: _median(latencies),
    prefix + '_mean': float(np.mean(latencies)) if has else None,
    prefix + '_p10': pct(10),
    prefix + '_p90': pct(90),
    prefix + '_all': list(latencies),
  }


def _fdb_reply(words, start: int, end: int, frame_rate: float):
  """The words starting in [start, end) -> (first word's start, whether FDB counts the reply
  as a takeover), or None when there are none."""
  reply = [(a, b) for a, b in words if start <= a < end]
  if not reply:
    return None
  seconds = (max(b for _, b in reply) - reply[0][0]) / frame_rate
  short = seconds < FDB_MIN_SECONDS and len(reply) <= FDB_MAX_SHORT_WORDS
  return reply[0][0], not short


def _rate(hits: int, total: int) -> float | None:
  return hits / total if total else None


def turn_taking(
  model_active,
  events: Iterable[tuple[str, int, int]],
  frame_rate: float = FRAME_RATE,
  max_wait_frames: int = 25,
  stop_frames: int = 3,
  rules: str = 'flmjax',
  words=None,
) -> dict:
  """model_active bool [F] and the events -> a dict of metrics (rates and medians over zero
  events are None):

  - takeover_rate: of the turn_end events, the fraction where the model is active at a frame f,
    start <= f < min(end, start + max_wait_frames) (the first such f: activity already on at
    start counts, with latency 0);
  - response_latency_ms: the median of (f - start) / frame_rate * 1000 over those takeovers;
    response_latency_ms_mean, _p10, _p90; response_latency_ms_all: the list;
  - pause_takeover_rate: of the pause events, the fraction where the model is active on any frame
    in [start, end) (lower is better);
  - interrupt_stop_rate: of the interrupt events, the fraction with a frame g,
    start <= g < min(end, start + max_wait_frames), where model_active[g : g + stop_frames] is all
    False (frames past F count as inactive);
  - interrupt_stop_latency_ms: the median of (g - start) / frame_rate * 1000 over those stops
    (g the first such frame); interrupt_stop_latency_ms_all: the list;
  - counts: the number of events of each kind.

  rules='fdb' scores turn ends and pauses as Full-Duplex-Bench does, from the model's words
  (`words`: [(start_frame, end_frame)] sorted, e.g. flmjax.eval.words): the reply to an event is
  the words starting in [start, end); it is a takeover when the first starts before
  min(end, start + max_wait_frames) (pauses: before end) unless the words span less than 1 s and
  number 3 or fewer (FDB_MIN_SECONDS, FDB_MAX_SHORT_WORDS); the latency is the first word's start.
  Interrupts are scored by activity under both rules.
  """
  if rules not in RULES:
    raise ValueError(f'rules={rules!r}: choose one of {RULES}')
  if rules == 'fdb':
    if words is None:
      raise ValueError("rules='fdb' scores the model's words: pass words=[(start, end)] in frames")
    words = sorted((int(a), int(b)) for a, b in words)
  active = np.asarray(model_active, bool)
  if active.ndim != 1:
    raise ValueError(f'model_active: expected a bool array [frames], got shape {active.shape}')
  if stop_frames < 1 or max_wait_frames < 1 or not frame_rate > 0:
    raise ValueError(
      f'stop_frames={stop_frames} and max_wait_frames={max_wait_frames} must be '
      f'>= 1 and frame_rate={frame_rate} > 0'
    )
  num_frames = active.shape[0]
  # silent[g]: frames g .. g + stop_frames - 1 are all inactive (past the end counts as inactive)
  padded = np.concatenate([active, np.zeros(stop_frames, bool)])  # [F + stop]
  window_any = np.lib.stride_tricks.sliding_window_view(padded, stop_frames)[: num_frames + 1]
  silent = ~window_any.any(axis=1)  # [F + 1]
  counts = dict.fromkeys(EVENT_KINDS, 0)
  latencies, stop_latencies = [], []
  takeovers = pause_hits = stops = 0
  ms = lambda frames: frames / frame_rate * 1000.0
  for kind, start, end in events:
    if kind not in EVENT_KINDS:
      raise ValueError(f'event kind {kind!r} is not one of {EVENT_KINDS}')
    start, end = int(start), int(end)
    if not 0 <= start <= end:
      raise ValueError(f'event ({kind!r}, {start}, {end}): need 0 <= start <= end')
    counts[kind] += 1
    stop = min(end, start + max_wait_frames)
    if kind != 'interrupt' and rules == 'fdb':
      reply = _fdb_reply(words, start, end, frame_rate)
      limit = stop if kind == 'turn_end' else end
      took = reply is not None and reply[1] and reply[0] < limit
      if kind == 'turn_end' and took:
        takeovers += 1
        latencies.append(ms(reply[0] - start))
      pause_hits += kind == 'pause' and took
    elif kind == 'turn_end':
      on = np.flatnonzero(active[start:stop])
      if on.size:
        takeovers += 1
        latencies.append(ms(int(on[0])))
    elif kind == 'pause':
      pause_hits += bool(active[start:end].any())
    else:
      quiet = np.flatnonzero(silent[min(start, num_frames) : min(stop, num_frames + 1)])
      if start >= num_frames and stop > start:  # the whole window lies past F: silent
        quiet = np.zeros(1, np.int64)
      if quiet.size:
        stops += 1
        stop_latencies.append(ms(int(quiet[0])))
  return {
    'rules': rules,
    'takeover_rate': _rate(takeovers, counts['turn_end']),
    **latency_summary(latencies),
    'pause_takeover_rate': _rate(pause_hits, counts['pause']),
    'interrupt_stop_rate': _rate(stops, counts['interrupt']),
    'interrupt_stop_latency_ms': _median(stop_latencies),
    'interrupt_stop_latency_ms_all': stop_latencies,
    'counts': counts,
  }
