"""The frame loop's fan-out runs in its own thread, beside the next tick's frame: checked with a
pipeline that echoes each slot's frame (no model) and a fan-out held back on purpose, so the
order of events, not the machine's speed, decides what the test sees."""

import asyncio
import threading
import types

import numpy as np

from flmjax.codec.base import FRAME_SIZE
from flmjax.decode import SamplingConfig
from flmjax.serve.clock import ManualClock
from flmjax.serve.frame_loop import FrameLoop
from flmjax.serve.pipeline import FrameOut
from flmjax.serve.session import Limits, Session

CFG = types.SimpleNamespace(text_wait_id=3, text_bos_id=1, text_eos_id=2)
TICKS = 4


class EchoPipeline:
  """Two slots; each step replies to a slot's frame with the frame itself, louder (some
  replies get clipped), its text id the step's number; the first step returns nothing."""

  slots, frame_size, max_len = 2, FRAME_SIZE, 1000

  def __init__(self):
    self.active = np.zeros((self.slots,), bool)
    self.steps = 0

  def starved(self):
    return np.zeros((self.slots,), bool)

  at_limit = starved

  def free_pages(self):
    return None

  def start(self, mask, sampling=None):
    self.active |= mask

  def stop(self, mask):
    self.active &= ~np.asarray(mask, bool)

  def step(self, pcm):
    self.steps += 1
    valid = self.active & (self.steps > 1)
    return FrameOut(np.full((self.slots,), 10 + self.steps, np.int32), 3 * pcm, valid)


def speech(seed: int) -> np.ndarray:
  return (0.2 * np.random.default_rng(seed).standard_normal(TICKS * FRAME_SIZE)).astype(np.float32)


def test_fan_out_overlaps_the_next_frame_and_keeps_each_sessions_replies():
  pipeline = EchoPipeline()
  loop = FrameLoop(pipeline, clock=ManualClock())
  greedy = SamplingConfig(greedy=True)
  sessions = [Session(f's{i}', i, None, CFG, greedy, Limits(), FRAME_SIZE) for i in range(2)]
  for s in sessions:
    loop.join(s)
    s.chunks.append(speech(s.slot))
    s.buffered = TICKS * FRAME_SIZE
  gate, encode = threading.Event(), Session.encode_reply
  held = []

  def held_encode(self, pcm, text_id):  # the fan-out thread waits until the test lets it go
    held.append(text_id)
    assert gate.wait(60), 'the test never released the fan-out'
    return encode(self, pcm, text_id)

  async def scenario():
    for _ in range(2):  # the first step returns nothing; the second's replies are held
      assert await loop.tick()
    third = asyncio.create_task(loop.tick())
    for _ in range(60000):  # until the third frame is back (a bound on a failing test only)
      if len(loop.recent_stages['frame']) == 3 or third.done():
        break
      await asyncio.sleep(0.001)
    for _ in range(100):  # the tick would hand its replies over now, were it allowed to
      await asyncio.sleep(0)
    # The third frame was computed while the second tick's replies were held, and the third
    # tick waits for them: one fan-out beside the frame, never a pile.
    seen = pipeline.steps, third.done(), [s.queue.qsize() for s in sessions]
    gate.set()
    assert await third
    assert await loop.tick()
    await loop.replies_sent()
    await loop.stop()
    return seen

  Session.encode_reply = held_encode
  try:
    seen = asyncio.run(scenario())
  finally:
    Session.encode_reply = encode
  assert seen == (3, False, [0, 0]) and pipeline.steps == TICKS and held[0] == 12
  for s in sessions:
    # The same messages, in the same order, as an inline push of each reply by a fresh session.
    inline = Session('ref', s.slot, None, CFG, greedy, Limits(), FRAME_SIZE)
    frames = (3 * speech(s.slot)).reshape(TICKS, FRAME_SIZE)
    for t in range(1, TICKS):
      inline.push(frames[t], 11 + t)
    got = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
    want = [inline.queue.get_nowait() for _ in range(inline.queue.qsize())]
    assert len(got) == 2 * (TICKS - 1) and got == want
    assert s.frames_out == TICKS - 1 and s.clipped['reply'] == inline.clipped['reply'] > 0
  assert len(loop.recent) == len(loop.recent_stages['fanout']) == TICKS
  assert len(loop.recent_stages['frame']) == TICKS
