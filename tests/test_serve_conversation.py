"""Whole conversations through `flmjax serve` and the client: 8 clients × 20 s of real speech (the
golden espeak-ng sentence) through `converse`, paced in real-time order, some of them sent loud
(peaks 1.0, 2.0, 4.0) to a model whose replies peak past full scale (the golden tiny LM with the
reduced Mimi). Every frame sent reaches the model, every reply arrives, and each session's text
and audio equal the offline replay of its own input (no cross-talk).

The server's ticks and the clients' pacing run on one ManualClock that the test moves one 80 ms
frame at a time, once every session's next frame is in and the previous tick is done: the test
counts frames and asserts nothing about the machine's speed.
"""

import asyncio

import numpy as np
import pytest
from serve_harness import FRAME, check_crosstalk, converse, running, wait_for

from flmjax.decode import SamplingConfig
from flmjax.serve.clock import ManualClock
from flmjax.serve.server import Server

pytestmark = pytest.mark.slow  # 8 sessions × 250 frames, then their offline replay

SESSIONS, FRAMES, LEAD = 8, 250, 2  # 20 s each; the clients send 2 frames ahead
PEAKS = (None, None, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0)  # None: the recording's own level (0.64)


@pytest.fixture(scope='module')
def pipeline(tiny_model, golden_dir):
  from flmjax.codec import load_mimi
  from flmjax.serve.pipeline import FramePipeline

  pipeline = FramePipeline(
    tiny_model,
    load_mimi(str(golden_dir / 'mimi_small')),
    SESSIONS,
    sampling=SamplingConfig(greedy=True),
    max_len=FRAMES + 6,
  )
  pipeline.warmup()
  return pipeline


def speech(golden_dir, session: int, peak: float | None) -> np.ndarray:
  """[FRAMES*1920]: the golden 4.96 s espeak-ng sentence, rotated per session, tiled to 20 s and
  scaled to `peak`."""
  pcm = np.load(golden_dir / 'mimi_small' / 'mimi.npz')['pcm'].astype(np.float32)
  pcm = np.tile(np.roll(pcm, session * 7919), FRAMES * FRAME // pcm.size + 1)[: FRAMES * FRAME]
  return pcm if peak is None else pcm * np.float32(peak / np.abs(pcm).max())


def test_eight_real_time_conversations_loud_and_quiet(pipeline, tiny_model, golden_dir):
  clock = ManualClock()
  server = Server(pipeline, sampling=SamplingConfig(greedy=True), clock=clock, record_input=True)
  loop = server.frame_loop

  def ready() -> bool:
    """Every session holds a slot and its next frame, and one still has frames to play."""
    live = [s for s in loop.slots if s is not None]
    return (
      len(live) == SESSIONS
      and all(s.buffered >= FRAME for s in live)
      and all(s.frames_in < FRAMES for s in live)
    )

  async def scenario():
    async with running(server) as addr:
      talks = [
        asyncio.create_task(
          converse(
            f'ws://{addr}/api/chat',
            speech(golden_dir, i, peak),
            lead_frames=LEAD,
            clock=clock,
          )
        )
        for i, peak in enumerate(PEAKS)
      ]
      ticks = 0
      while not all(t.done() for t in talks):
        if not ready():
          await asyncio.sleep(0.005)
          continue
        before = loop.ticks
        await clock.advance(0.08)  # one frame of time: every client sends, the loop ticks once
        assert await wait_for(lambda before=before: loop.ticks > before, 120, step_s=0.002)
        ticks += 1
      return [t.result() for t in talks], ticks, loop.metrics.text().decode()

  # The bound only decides how long a failing (hanging) run takes.
  convs, ticks, metrics = asyncio.run(asyncio.wait_for(scenario(), 1800))
  ended = {s.sid: s for s in server.finished}
  by_slot = {ended[c.session].slot: c for c in convs}
  assert sorted(by_slot) == list(range(SESSIONS)) and ticks == FRAMES
  for conv, peak in zip(convs, PEAKS):
    s = ended[conv.session]
    # Every frame sent reached the model, as the client's own decoder heard it (clipped too).
    assert conv.frames_sent == s.frames_in == FRAMES, (peak, s.summary())
    got = np.concatenate(s.recorded[:FRAMES])
    np.testing.assert_array_equal(got, conv.sent_pcm)
    assert s.underruns == 0, s.summary()
    # Every reply arrived (the first step returns nothing), at most full scale.
    assert conv.frames_received == FRAMES - 1 and conv.close_code == 1000, s.summary()
    assert np.abs(conv.reply_pcm).max() <= 1.0
    assert s.reason == 'client closed' and s.clipped['reply'] > 0, s.summary()
    if peak is not None and peak > 1.0:
      assert s.clipped['input'] > 0 and np.abs(conv.sent_pcm).max() == 1.0, s.summary()
    if peak is None:
      assert s.clipped['input'] == 0, s.summary()
  found = check_crosstalk(pipeline, tiny_model.cfg, by_slot)
  assert found == {slot: [] for slot in by_slot}, found
  clipped = {
    stream: float(line.split()[-1])
    for stream in ('input', 'reply')
    for line in metrics.splitlines()
    if line.startswith(f'flmjax_clipped_total{{stream="{stream}"}}')
  }
  assert clipped['input'] == sum(ended[c.session].clipped['input'] for c in convs) > 0
  assert clipped['reply'] == sum(ended[c.session].clipped['reply'] for c in convs) > 0
