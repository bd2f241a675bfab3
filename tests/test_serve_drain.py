"""Draining on SIGTERM, against an injected clock (flmjax.serve.clock.ManualClock): /healthz turns
503, new sessions are refused, a queued one is sent away at once with 1013, live ones keep
running for --drain-s and no longer, then the last one is closed with 1001; the HAProxy agent
reports the free capacity, then "drain". The model is an echo pipeline (the drain never looks at
the model's output); the whole path through replicas and HAProxy is tests/test_serve_replicas.py.
"""

import asyncio
import os
import signal
import socket
import types

import aiohttp
import numpy as np
from aiohttp import web
from probe import error_line

from flmjax.config import ModelConfig
from flmjax.decode import SamplingConfig
from flmjax.serve import drain, protocol
from flmjax.serve.client import converse
from flmjax.serve.clock import ManualClock
from flmjax.serve.net import bind_socket
from flmjax.serve.pipeline import FrameOut
from flmjax.serve.server import Server
from flmjax.serve.session import Limits

S = 1920
BOUND = 30.0  # real seconds: only ends a failing run (the test's time is virtual)


class EchoPipeline:
  """FramePipeline's interface, each live row replying with its own input and text id 0."""

  def __init__(self, slots: int):
    self.cfg, self.slots, self.frame_size, self.max_len = ModelConfig.tiny(), slots, S, 10_000
    self.active = np.zeros((slots,), bool)
    self.frames = np.zeros((slots,), np.int64)
    self.decoder = types.SimpleNamespace(sampling=None)  # the server's default (tests pass theirs)

  def start(self, mask, sampling=None, seeds=None):
    self.active |= mask
    self.frames[mask] = 0

  def stop(self, mask):
    self.active &= ~np.asarray(mask, bool)

  def check_sampling(self, sampling):
    pass

  def step(self, pcm):
    self.frames[self.active] += 1
    return FrameOut(np.zeros((self.slots,), np.int32), pcm.copy(), self.active.copy())

  def free_pages(self):
    return None  # a contiguous cache: slots alone bound admission

  def starved(self):
    return np.zeros((self.slots,), bool)  # no page pool, so no session waits for a page

  def at_limit(self):
    return self.active & (self.frames >= self.max_len)  # overflow='error': full rows end


async def agent_says(port: int) -> str:
  reader, writer = await asyncio.open_connection('127.0.0.1', port)
  line = await reader.readline()
  writer.close()
  return line.decode()


def test_sigterm_drains_queue_at_once_live_sessions_up_to_drain_s_then_1001():
  clock = ManualClock()
  server = Server(
    EchoPipeline(2),
    sampling=SamplingConfig(),
    queue=1,
    clock=clock,
    limits=Limits(idle_s=1000.0),  # longer than the drain: no session ends for being idle
  )
  drained = asyncio.Event()

  async def scenario():
    app = server.app()
    drain.install(app, server, drain_s=5.0, on_drained=drained.set)
    agent_sock = bind_socket('127.0.0.1', 0)
    drain.add_agent(app, server, agent_sock)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    port = runner.addresses[0][1]
    agent_port = agent_sock.getsockname()[1]
    url = f'http://127.0.0.1:{port}'
    seen = {}
    async with aiohttp.ClientSession() as http:
      seen['agent_empty'] = await agent_says(agent_port)
      ws = [await http.ws_connect(f'{url}/api/chat?codec=pcm16') for _ in range(2)]
      for w in ws:
        assert (await w.receive(timeout=BOUND)).data == bytes([protocol.HANDSHAKE])
      notices = []  # the third session waits in the queue
      queued = asyncio.create_task(
        converse(
          f'ws://127.0.0.1:{port}/api/chat',
          np.zeros(3 * S, np.float32),
          codec='pcm16',
          notice_hook=notices.append,
          clock=clock,
        )
      )
      for _ in range(1000):
        if notices:
          break
        await asyncio.sleep(0.01)
      assert notices == ['server full: you are number 1 in the queue for a free slot\n']
      seen['agent_full'] = await agent_says(agent_port)

      start = clock.time()
      os.kill(os.getpid(), signal.SIGTERM)  # the handler `install` put on the running loop
      for _ in range(50):
        await asyncio.sleep(0)
      try:  # sent away before any virtual time passed
        await asyncio.wait_for(queued, BOUND)
      except ConnectionError as e:
        seen['queued_close'] = str(e)
      async with http.get(f'{url}/healthz') as r:
        seen['healthz'] = (r.status, (await r.json())['status'])
      async with http.get(f'{url}/api/chat') as r:  # a new session (plain GET is refused first)
        seen['new_session'] = r.status
      seen['agent_draining'] = await agent_says(agent_port)

      # Sessions keep running while draining: three frames in, three echoed replies out.
      pcm = np.linspace(-0.5, 0.5, 3 * S, dtype=np.float32)
      await ws[1].send_bytes(bytes([protocol.AUDIO]) + protocol.Pcm16Writer().encode(pcm))
      for _ in range(100):  # a tick's compute runs in a thread: step until three ran
        if server.pipeline.frames[1] >= 3:
          break
        await clock.advance(0.08)
        await asyncio.sleep(0.01)
      replies = []
      while len(replies) < 3:
        msg = await ws[1].receive(timeout=BOUND)
        if msg.data[0] == protocol.AUDIO:
          replies.append(protocol.Pcm16Reader().decode(msg.data[1:]))
      seen['echo'] = np.concatenate(replies)
      seen['expected_echo'] = protocol.Pcm16Reader().decode(protocol.Pcm16Writer().encode(pcm))

      await ws[0].close()  # one session ends on its own during the drain
      await clock.advance(start + 4.9 - clock.time())  # 4.9 s into the drain
      for _ in range(50):
        await asyncio.sleep(0)
      live = sum(s is not None for s in server.frame_loop.slots)
      seen['at_4.9s'] = (ws[1].closed, drained.is_set(), live)
      await clock.advance(0.2)  # 5.1 s: the drain time ran out
      last = await ws[1].receive(timeout=BOUND)
      while last.type == aiohttp.WSMsgType.BINARY:  # replies still queued before the close
        last = await ws[1].receive(timeout=BOUND)
      seen['live_close'] = (last.type, last.data, last.extra)
      await asyncio.wait_for(drained.wait(), BOUND)
      metrics = (await (await http.get(f'{url}/metrics')).read()).decode()
    await runner.cleanup()
    return seen, metrics

  # Should `install` fail to take SIGTERM, the signal must fail this test, not end pytest.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    seen, metrics = asyncio.run(scenario())
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert seen['agent_empty'] == 'ready up 100% maxconn:3\n'
  assert seen['agent_full'] == 'ready up 1% maxconn:3\n'  # 2 slots and the one queue place taken
  assert seen['queued_close'].endswith(
    'closed before the session began: 1013 server draining: no slot was given; reconnect to '
    'reach another replica'
  )
  assert seen['healthz'] == (503, 'draining')
  assert seen['new_session'] == 503
  assert seen['agent_draining'] == 'drain\n'
  np.testing.assert_array_equal(seen['echo'], seen['expected_echo'])
  assert seen['at_4.9s'] == (False, False, 1)  # still live, the drain not over
  assert seen['live_close'][:2] == (aiohttp.WSMsgType.CLOSE, 1001)
  assert 'drain time of 5 s (--drain-s) ran out' in seen['live_close'][2]
  for line in (
    'flmjax_draining 1.0',
    'flmjax_drain_refused_total 1.0',
    'flmjax_drain_sent_away_total 1.0',
    'flmjax_drain_cut_total 1.0',
  ):
    assert line in metrics, line
  assert [s.close_code for s in server.finished] == [1013, 1000, 1001]


def test_drain_with_nothing_live_returns_at_once():
  server = Server(EchoPipeline(1), sampling=SamplingConfig(), clock=ManualClock())
  assert asyncio.run(drain.drain(server, 60.0)) == 0
  assert server.draining


SERVE = ('serve', '--checkpoint', '/nonexistent/ckpt', '--mimi', '/nonexistent/mimi', '--port', '0')


def test_drain_and_agent_flags_checked_before_loading(capsys):
  line = error_line(capsys, *SERVE, '--drain-s', '-1')
  assert 'flmjax serve: error: --drain-s -1 must be >= 0' in line
  line = error_line(capsys, *SERVE, '--agent-port', '70000')
  assert '--agent-port 70000 must lie in 0..65535' in line
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    line = error_line(capsys, *SERVE, '--agent-port', str(port))
  assert f'--agent-port {port}: cannot listen: the port is in use' in line
  assert 'pass another --agent-port' in line
  # Both ports free: bound, then the missing checkpoint is what fails (and both are freed).
  line = error_line(capsys, *SERVE, '--agent-port', '0', '--drain-s', '0')
  assert '--checkpoint' in line
