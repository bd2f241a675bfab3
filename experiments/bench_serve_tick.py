"""CPU time of the serve frame loop's tick, by component, in one process: N in-process sessions
(real `Session`s, Ogg/Opus both ways, no sockets) driven through `FrameLoop.tick` on the golden
tiny LM and reduced Mimi (greedy), as `load_serve.py` serves them.

  .venv/bin/python experiments/bench_serve_tick.py --sessions 32 --ticks 60
  .venv/bin/python experiments/bench_serve_tick.py --sessions 32 --profile   # + cProfile top

Each tick: every session's input message (its next 80 ms of the golden sentence, Opus-encoded
beforehand like a client would) is decoded as `Session.receive` does ('input'), then one
`FrameLoop.tick` (gather the frames, the jitted frame, fan the replies out: text, clip, Opus
encode, queue), then the reply queues are emptied (what `Session.send` hands to the sockets;
socket writes are not measured). CPU seconds are read per thread (`time.thread_time`) around
each component and for the whole process (`time.process_time`, XLA's threads included), so a
shared box moves them less than wall time; wall time is printed too but says little there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pathlib
import pstats
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'golden'


class Meter:
  """Thread CPU seconds accumulated per component, whichever thread runs it."""

  def __init__(self):
    self.cpu: dict[str, float] = {}
    self.lock = threading.Lock()

  @contextlib.contextmanager
  def part(self, name: str):
    t = time.thread_time()
    try:
      yield
    finally:
      with self.lock:
        self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - t

  def wrap(self, owner, attr: str, name: str) -> None:
    """Meters owner.attr (a function on a class or module) under `name`."""
    fn = getattr(owner, attr)
    meter = self

    def metered(*args, **kwargs):
      with meter.part(name):
        return fn(*args, **kwargs)

    setattr(owner, attr, metered)


def speech(session: int, frames: int) -> np.ndarray:
  """The golden 4.96 s sentence rotated per session and tiled (load_serve.py's input)."""
  pcm = np.load(GOLDEN / 'mimi_small' / 'mimi.npz')['pcm'].astype(np.float32)
  pcm = np.roll(pcm, session * 7919)
  n = frames * 1920
  return np.tile(pcm, n // pcm.size + 1)[:n]


def build(N: int, ticks: int):
  """The pipeline (compiled), its frame loop with N joined sessions, and each session's input
  messages [session][tick], Opus-encoded beforehand as a client would."""
  from flmjax.codec import load_mimi
  from flmjax.decode import SamplingConfig
  from flmjax.decode.session import load_model
  from flmjax.serve import protocol
  from flmjax.serve.clock import ManualClock
  from flmjax.serve.frame_loop import FrameLoop
  from flmjax.serve.pipeline import FramePipeline
  from flmjax.serve.session import Limits, Session

  sampling = SamplingConfig(greedy=True)
  model = load_model(str(GOLDEN / 'flm_tiny'))
  mimi = load_mimi(str(GOLDEN / 'mimi_small'))
  pipeline = FramePipeline(model, mimi, N, sampling=sampling, max_len=ticks + 64)
  pipeline.warmup()
  loop = FrameLoop(pipeline, clock=ManualClock())
  sessions, messages = [], []
  for i in range(N):
    limits = Limits(max_queue_frames=10**6)
    sessions.append(Session(f's{i}', i, None, pipeline.cfg, sampling, limits, 1920))
    loop.join(sessions[-1])
    writer = protocol.OpusWriter()
    pcm = speech(i, ticks + 1).reshape(-1, 1920)
    messages.append([bytes([protocol.AUDIO]) + writer.encode(f) for f in pcm])
  return loop, sessions, messages


def meter_components():
  """A Meter over the tick's parts (class attributes patched for this process)."""
  from flmjax.serve import frame_loop, protocol
  from flmjax.serve.frame_loop import FrameLoop
  from flmjax.serve.pipeline import FramePipeline
  from flmjax.serve.session import Session

  meter = Meter()
  if hasattr(frame_loop, '_encode'):  # the fan-out in its own thread (issue 26 on)
    meter.wrap(frame_loop, '_encode', 'fan-out: encode (own thread)')
    meter.wrap(Session, 'deliver', 'fan-out: queue (event loop)')
  else:  # the fan-out inline, at the end of the tick
    meter.wrap(Session, 'push', 'fan-out: encode + queue (inline)')
  meter.wrap(FrameLoop, '_compute', 'compute (frame thread)')
  meter.wrap(FramePipeline, 'step', 'pipeline.step')
  meter.wrap(Session, 'take_frame', 'take_frame')
  meter.wrap(protocol.OpusWriter, 'encode', 'opus encode')
  meter.wrap(protocol.TextStream, 'add', 'text')
  return meter


async def run(args) -> dict:
  N, ticks = args.sessions, args.warmup + args.ticks
  loop, sessions, messages = build(N, ticks)
  meter = meter_components()
  drain = getattr(loop, 'replies_sent', None)  # a loop that fans out in its own thread

  async def one_tick(t: int) -> tuple[float, float, float]:
    wall, proc, main = time.perf_counter(), time.process_time(), time.thread_time()
    with meter.part('input (Opus decode)'):
      for s in sessions:  # what Session.receive does with a message
        pcm = s.reader.decode(messages[s.slot][t][1:])
        s.chunks.append(pcm)
        s.buffered += pcm.size
    with meter.part('tick (main thread)'):
      await loop.tick()
    if drain is not None:
      await drain()
    for s in sessions:  # what Session.send takes
      while not s.queue.empty():
        s.queue.get_nowait()
    now = time.perf_counter(), time.process_time(), time.thread_time()
    return now[0] - wall, now[1] - proc, now[2] - main

  for t in range(args.warmup):
    await one_tick(t)
  meter.cpu.clear()
  profile = cProfile.Profile() if args.profile else None
  if profile:
    profile.enable()
  rows = [await one_tick(t) for t in range(args.warmup, ticks)]
  if profile:
    profile.disable()
    pstats.Stats(profile, stream=sys.stderr).sort_stats('tottime').print_stats(25)
  await loop.stop()
  for s in sessions:
    assert s.frames_out == ticks - 1 and not s.closed.is_set(), (s.sid, s.frames_out, s.reason)
  wall, proc, main = np.asarray(rows).T
  n = args.ticks
  cpu = {k: 1000 * v / n for k, v in meter.cpu.items()}
  fanout = sum(v for k, v in cpu.items() if k.startswith('fan-out'))
  return {
    'fanout_in_own_thread': drain is not None,
    'fanout_stage_cpu_ms_per_tick': round(fanout, 2),
    'frame_stage_cpu_ms_per_tick': round(  # the rest of the tick: gather, the jitted frame
      1000 * proc.sum() / n - fanout - cpu['input (Opus decode)'], 2
    ),
    'sessions': N,
    'ticks': n,
    'process_cpu_ms_per_tick': round(1000 * proc.sum() / n, 2),
    'main_thread_cpu_ms_per_tick': round(1000 * main.sum() / n, 2),
    'wall_ms_per_tick_median': round(1000 * float(np.median(wall)), 2),
    'thread_cpu_ms_per_tick': {k: round(v, 2) for k, v in sorted(cpu.items())},
  }


def main() -> int:
  from flmjax.platforms import cpu_unless_accelerator

  cpu_unless_accelerator()
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--sessions', type=int, default=32)
  ap.add_argument('--ticks', type=int, default=60)
  ap.add_argument('--warmup', type=int, default=5)
  ap.add_argument('--profile', action='store_true', help='cProfile of the main thread (stderr)')
  args = ap.parse_args()
  print(json.dumps(asyncio.run(run(args))), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
