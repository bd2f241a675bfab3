"""Real-time pacing checked against an injected clock (flmjax.serve.clock.ManualClock), so the
tests depend on nothing but the code: the frame loop ticks every 80 ms and never bursts after a
late tick, the client sends one frame per 80 ms after its lead, and a timeout fires exactly when
virtual time passes it. Real pacing under load is measured by experiments/load_serve.py."""

import asyncio
import types

import numpy as np
import pytest
from aiohttp import web

from flmjax.serve import protocol
from flmjax.serve.client import converse
from flmjax.serve.clock import ManualClock
from flmjax.serve.frame_loop import FrameLoop


def test_frame_loop_ticks_every_period_and_never_bursts():
  clock = ManualClock(start=100.0)
  frame_loop = FrameLoop(types.SimpleNamespace(slots=2), clock=clock)
  ticks, cost = [], {3: 0.25}  # the 4th tick takes 250 ms: three periods and a bit

  async def tick():
    ticks.append(round(clock.time() - 100.0, 6))
    clock.now += cost.get(len(ticks) - 1, 0.01)  # the tick's own (virtual) compute time
    return True

  frame_loop.tick = tick

  async def scenario():
    task = asyncio.create_task(frame_loop.run())
    await clock.advance(1.0)
    task.cancel()

  asyncio.run(scenario())
  # 0, 80, 160, 240 ms; the slow tick ends at 490 ms, over a whole period late: the next tick
  # starts at once (no catch-up burst of the missed ticks), then every 80 ms from there.
  assert ticks[:4] == [0.0, 0.08, 0.16, 0.24]
  assert ticks[4:] == pytest.approx([0.49, 0.57, 0.65, 0.73, 0.81, 0.89, 0.97])
  assert frame_loop.metrics.late_ticks._value.get() == 1


def test_client_paces_one_frame_per_period_after_its_lead():
  clock = ManualClock()

  async def chat(request):  # a server that only listens
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_bytes(bytes([protocol.HANDSHAKE]))
    async for _ in ws:
      pass
    return ws

  async def scenario():
    app = web.Application()
    app.router.add_get('/api/chat', chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    [(_, port)] = runner.addresses
    pcm = np.zeros(10 * 1920, np.float32)
    talk = asyncio.create_task(
      converse(f'ws://127.0.0.1:{port}/api/chat', pcm, lead_frames=3, replies=0, clock=clock)
    )
    while not talk.done():  # virtual time moves only while the client waits on it
      await asyncio.sleep(0.01)
      if clock.next_deadline() is not None:
        await clock.advance(clock.next_deadline() - clock.time())
    conv = await talk
    await runner.cleanup()
    return conv

  conv = asyncio.run(scenario())
  assert conv.frames_sent == 10
  # Three frames at once, then one per 80 ms: frame i >= 3 leaves at (i - 3) * 80 ms.
  assert conv.send_times == pytest.approx([0, 0, 0, 0, 0.08, 0.16, 0.24, 0.32, 0.40, 0.48])


def test_manual_clock_timeout_fires_when_virtual_time_passes_it():
  clock = ManualClock()

  async def scenario():
    never = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(clock.wait_for(never, 0.5))
    await clock.advance(0.49)
    early = waiting.done()
    await clock.advance(0.02)
    with pytest.raises(asyncio.TimeoutError):
      await waiting
    assert never.cancelled()
    done = asyncio.get_running_loop().create_future()
    done.set_result(7)
    return early, await clock.wait_for(done, 0.5)

  assert asyncio.run(scenario()) == (False, 7)
