"""The one batched frame loop: every 80 ms it gathers a frame from each live session, runs the
pipeline for all slots in a worker thread (jitted calls release the GIL, so sockets keep moving)
and fans the replies out. Sessions join and leave between ticks by masking rows.

The fan-out (Opus-encoding each reply, which holds the GIL: about 1 ms a session) runs in a
thread of its own, so it overlaps the next tick's jitted frame, which runs on another core
without the GIL: a tick's cost is the larger of the two stages, not their sum. One fan-out
thread, and each tick's replies queued after the previous tick's: every session gets its
replies in order, the same messages as a loop that encoded them inline. A tick hands its replies
over only once the previous tick's are queued, so a fan-out slower than the period slows the
ticks (and counts late ticks) as an inline one would, rather than letting replies pile up.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time

import numpy as np
import prometheus_client as prom

from flmjax.decode import SamplingConfig
from flmjax.serve.clock import Clock
from flmjax.serve.pipeline import FramePipeline
from flmjax.serve.session import Session, log

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.4, 0.8)


def _quantile(recent, q: float) -> float:
  return float(np.quantile(recent, q)) if recent else 0.0


class Metrics:
  """The server's Prometheus metrics, in a registry of its own (one per server)."""

  def __init__(self, slots: int, recent_latencies, recent_stages: dict):
    self.registry = r = prom.CollectorRegistry()
    self.live = prom.Gauge('flmjax_sessions_live', 'sessions holding a slot', registry=r)
    prom.Gauge('flmjax_slots', 'session slots of the batched frame loop', registry=r).set(slots)
    self.sessions = prom.Counter(
      'flmjax_sessions',
      'sessions given a slot, by client: the browser page or any other (api)',
      ['client'],
      registry=r,
    )
    for client in ('page', 'api'):
      self.sessions.labels(client)  # both series exist from the start
    self.queued = prom.Gauge('flmjax_sessions_queued', 'sessions waiting for a slot', registry=r)
    self.refused = prom.Counter(
      'flmjax_sessions_refused', 'sessions refused (all slots taken and the queue full)', registry=r
    )
    self.frames = prom.Counter('flmjax_frames', 'session frames computed', registry=r)
    self.pool_full = prom.Counter(
      'flmjax_kv_pool_full',
      'sessions ended because they needed a KV page and the paged pool had none free',
      registry=r,
    )
    self.pages_free = prom.Gauge(
      'flmjax_kv_pages_free', 'free pages of the paged KV pool', registry=r
    )
    self.underruns = prom.Counter(
      'flmjax_underruns', 'frames a client was late for (silence fed)', registry=r
    )
    self.bad_audio = prom.Counter(
      'flmjax_bad_audio_sessions',
      'sessions ended by malformed or corrupted audio (Opus errors, Ogg CRC, non-finite pcm; '
      'never its level)',
      registry=r,
    )
    self.clipped = prom.Counter(
      'flmjax_clipped',
      'audio clipped to [-1, 1] and played (never refused for its level): input messages '
      'from clients, reply frames from the model',
      ['stream'],
      registry=r,
    )
    for stream in ('input', 'reply'):
      self.clipped.labels(stream)
    self.late_ticks = prom.Counter(
      'flmjax_late_ticks', 'ticks that started a frame late', registry=r
    )
    self.latency = prom.Histogram(
      'flmjax_frame_loop_seconds',
      'time of one tick, from its start until its replies are queued: gather, Mimi encode, LM '
      "step, Mimi decode, then the replies' fan-out (which overlaps the next tick's frame)",
      buckets=LATENCY_BUCKETS,
      registry=r,
    )
    quantiles = prom.Gauge(
      'flmjax_frame_loop_recent_seconds',
      'tick time (start to replies queued) quantiles over the last ticks',
      ['quantile'],
      registry=r,
    )
    stages = prom.Gauge(
      'flmjax_frame_loop_stage_recent_seconds',
      'time of each stage of a tick, quantiles over the last ticks: frame (gather, Mimi encode, '
      "LM step, Mimi decode) and fanout (the replies' Opus encoding and queueing, in its own "
      'thread); the loop keeps real time while each stays under the period',
      ['stage', 'quantile'],
      registry=r,
    )
    for q in (0.5, 0.99):
      quantiles.labels(str(q)).set_function(lambda q=q: _quantile(recent_latencies, q))
      for stage, recent in recent_stages.items():
        stages.labels(stage, str(q)).set_function(lambda q=q, x=recent: _quantile(x, q))

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


class FrameLoop:
  """clock: what the ticks wait on (real time by default; tests pass a ManualClock)."""

  def __init__(
    self,
    pipeline: FramePipeline,
    *,
    period_s: float = 0.08,
    recent: int = 10000,
    clock: Clock | None = None,
  ):
    self.pipeline, self.period, self.clock = pipeline, period_s, clock or Clock()
    B = pipeline.slots
    self.slots: list[Session | None] = [None] * B
    self.leaving = np.zeros((B,), bool)
    self.sampling_updates: dict[int, SamplingConfig] = {}
    self.recent = collections.deque(maxlen=recent)  # tick start -> its replies queued, seconds
    self.recent_stages = {stage: collections.deque(maxlen=recent) for stage in ('frame', 'fanout')}
    self.metrics = Metrics(B, self.recent, self.recent_stages)
    self.ticks = 0
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='frame-loop')
    self._fanout = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='frame-fanout')
    self._fanning: asyncio.Task | None = None  # the latest tick's fan-out
    self._task: asyncio.Task | None = None

  # ---- slots --------------------------------------------------------------------------------
  def claim(self) -> int | None:
    """A free slot, or None when every slot is taken."""
    if self.pipeline.free_pages() == 0:  # paged: a new session would find no page
      return None
    for slot, s in enumerate(self.slots):
      if s is None:
        return slot
    return None

  def join(self, session: Session) -> None:
    self.slots[session.slot] = session
    self.metrics.sessions.labels(session.client).inc()
    self.metrics.live.inc()

  def leave(self, session: Session) -> None:
    """Frees the session's slot; its LM row is released at the next tick."""
    if session.slot is not None and self.slots[session.slot] is session:
      self.slots[session.slot] = None
      self.leaving[session.slot] |= session.started
      self.sampling_updates.pop(session.slot, None)
      self.metrics.live.dec()

  def update_sampling(self, session: Session, sampling: SamplingConfig) -> None:
    """New sampling for a live session, from the next tick (or its start) on."""
    self.pipeline.check_sampling(sampling)
    session.sampling = sampling
    if session.started:
      self.sampling_updates[session.slot] = sampling

  def find(self, sid: str) -> Session | None:
    return next((s for s in self.slots if s is not None and s.sid == sid), None)

  # ---- the loop -----------------------------------------------------------------------------
  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self.run())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._worker.shutdown(wait=True)
    await self.replies_sent()
    self._fanout.shutdown(wait=True)
    # Rows of sessions that left after the last tick would otherwise stay active in the
    # pipeline, and advance under the next server built on it.
    self.pipeline.stop(self.pipeline.active.copy())

  async def run(self) -> None:
    clock = self.clock
    next_tick = clock.time()
    while True:
      await clock.sleep_until(next_tick)
      try:
        await self.tick()
      except Exception:  # a bug in one tick must not stop every session's loop
        log.exception('frame loop tick failed')
      next_tick += self.period
      if clock.time() > next_tick + self.period:  # fell a whole frame behind: do not burst
        self.metrics.late_ticks.inc()
        next_tick = clock.time()

  async def tick(self) -> bool:
    """One frame for every live slot, its replies handed to the fan-out; False when there was
    nothing to compute (idle ticks stay out of the latency statistics)."""
    start = time.perf_counter()  # the tick's cost in real time (the latency metrics)
    B, S = self.pipeline.slots, self.pipeline.frame_size
    stop, self.leaving = self.leaving, np.zeros((B,), bool)
    starts: dict[SamplingConfig, np.ndarray] = {}
    pcm = np.zeros((B, S), np.float32)
    live = []
    starved, at_limit = self.pipeline.starved(), self.pipeline.at_limit()
    for slot, s in enumerate(self.slots):
      if s is not None and s.started and at_limit[slot]:
        s.end(f'session length limit: {self.pipeline.max_len} frames', code=1000)
      if s is not None and s.started and starved[slot] and not s.closed.is_set():
        self.metrics.pool_full.inc()
        s.end('the KV page pool is full: the session cannot grow', code=1000)
      if s is None or s.closed.is_set():
        stop[slot] |= s is not None and s.started  # ended, not yet left: stop its row now
        continue
      if not s.started:
        if not s.has_frame():
          continue  # the session's stream begins with its first full frame
        s.started = True
        starts.setdefault(s.sampling, np.zeros((B,), bool))[slot] = True
      underruns = s.underruns
      pcm[slot] = s.take_frame()
      self.metrics.underruns.inc(s.underruns - underruns)
      live.append((slot, s))
    if not live and not stop.any():
      return False
    updates, self.sampling_updates = self.sampling_updates, {}
    out, late = await asyncio.get_running_loop().run_in_executor(
      self._worker, self._compute, stop, starts, updates, pcm
    )
    for slot in np.flatnonzero(late):  # started this tick, and the pool had no page left
      self.metrics.pool_full.inc()
      if self.slots[slot] is not None:
        self.slots[slot].end('the KV page pool is full: retry later', code=1013)
    if (free := self.pipeline.free_pages()) is not None:
      self.metrics.pages_free.set(free)
    self.ticks += 1
    self.metrics.frames.inc(len(live))
    replies = [  # a session that left during the compute (maybe replaced) gets none
      (slot, s)
      for slot, s in live
      if self.slots[slot] is s and out.valid[slot] and not s.closed.is_set()
    ]
    self.recent_stages['frame'].append(time.perf_counter() - start)
    if self._fanning is not None:  # one fan-out beside the frame at most: a slow fan-out
      await asyncio.wait([self._fanning])  # slows the ticks (late ticks), never piles up
    self._fanning = asyncio.get_running_loop().create_task(
      self._fan_out(start, replies, out, self._fanning)
    )
    return True

  async def replies_sent(self) -> None:
    """Until every computed tick's replies are queued to their sessions."""
    if self._fanning is not None:
      await asyncio.wait([self._fanning])

  async def _fan_out(self, start: float, replies: list, out, previous) -> None:
    """Encodes a tick's replies in the fan-out thread, then queues them on the event loop once
    the previous tick's are queued (to the sessions live at the tick's end, as an inline
    fan-out would have)."""
    try:
      encoded, took = await asyncio.get_running_loop().run_in_executor(
        self._fanout, _encode, replies, out
      )
      if previous is not None:
        await asyncio.wait([previous])
      begin = time.perf_counter()
      for s, messages, peak in encoded:  # who gets replies was decided at the tick's end
        if isinstance(messages, Exception):  # ends its own session only
          log.error('session %s: encoding a reply failed: %r', s.sid, messages)
          s.end(f'reply encoding failed: {type(messages).__name__}: {messages}', 1011)
        else:
          s.deliver(messages, peak)
      end = time.perf_counter()
      self.recent_stages['fanout'].append(took + end - begin)
      self.recent.append(end - start)
      self.metrics.latency.observe(end - start)
    except Exception:
      log.exception('frame loop fan-out failed')

  def _compute(self, stop, starts, updates, pcm):
    """Runs in the worker thread: the only code that touches the pipeline while serving."""
    p = self.pipeline
    p.stop(stop)
    for sampling, mask in starts.items():
      p.start(mask, sampling)
    for slot, sampling in updates.items():
      mask = np.zeros((p.slots,), bool)
      mask[slot] = True
      p.set_sampling(mask, sampling)
    late = p.starved()  # sessions started this tick that found no page: stopped, never run
    p.stop(late)
    return p.step(pcm), late


def _encode(replies: list, out) -> tuple[list, float]:
  """Runs in the fan-out thread: [(slot, session)] of one tick -> ([(session, messages or the
  exception encoding raised, peak)], seconds taken)."""
  start, encoded = time.perf_counter(), []
  for slot, s in replies:
    try:
      encoded.append((s, *s.encode_reply(out.pcm[slot], int(out.text[slot]))))
    except Exception as e:
      encoded.append((s, e, 0.0))
  return encoded, time.perf_counter() - start
