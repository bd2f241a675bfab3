"""Bad clients affect only their own session: two good sessions get every frame played (no
underrun) and their exact outputs while, in the other two slots, clients send malformed Opus, an
unknown kind byte, a text message, an oversized message, vanish mid-frame, or stop reading. Each
bad session ends with its reason and frees its slot."""

import asyncio

import numpy as np
import pytest
from serve_harness import RawSocket, check_crosstalk, converse, running, voice, wait_for

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.server import Server
from flmjax.serve.session import Limits

pytestmark = pytest.mark.slow  # a serving scenario with 250-frame sessions

LIMITS = Limits(max_message_bytes=8192, max_unsent_bytes=4096, socket_send_buffer=4096, idle_s=60)


def opus_frames(seed: int, frames: int) -> list[bytes]:
  writer, pcm = protocol.OpusWriter(), voice(seed, frames)
  return [b'\x01' + writer.encode(pcm[i * 1920 : (i + 1) * 1920]) for i in range(frames)]


def bad_clients(addr: str):
  """(name, blocking function) pairs; each returns a RawSocket left open or closed."""

  def malformed():
    raw = RawSocket(addr)
    raw.send(opus_frames(1, 1)[0])
    raw.send(b'\x01' + b'not an ogg page' * 10)
    return raw

  def unknown_kind():
    raw = RawSocket(addr)
    raw.send(b'\x07hello')
    return raw

  def text_message():
    raw = RawSocket(addr)
    raw.send(b'hi', opcode=1)
    return raw

  def oversized():
    raw = RawSocket(addr)
    raw.send(b'\x01' + bytes(LIMITS.max_message_bytes + 10))
    return raw

  def vanished():
    raw = RawSocket(addr)
    for frame in opus_frames(2, 3):
      raw.send(frame)
    whole = b'\x82\xfe' + (1000).to_bytes(2, 'big') + b'\0\0\0\0' + b'\x01' * 100
    raw.sock.sendall(whole)  # a frame header promising 1000 bytes, then the client is gone
    raw.close()
    return raw

  def stalled():  # sends 6 s of audio up front, then never reads (or sends) again
    raw = RawSocket(addr, rcvbuf=4096)
    for frame in opus_frames(3, 75):
      raw.send(frame)
    return raw

  return [
    ('malformed', malformed, 'malformed Opus'),
    ('kind', unknown_kind, 'unknown message kind 7'),
    ('text', text_message, 'expected binary messages, got TEXT'),
    ('oversized', oversized, 'websocket error'),
    ('vanished', vanished, ''),
    ('stalled', stalled, 'stalled reader'),
  ]


def test_bad_clients_end_only_their_session(serve_pipeline, tiny_model):
  server = Server(serve_pipeline, sampling=SamplingConfig(greedy=True), limits=LIMITS)

  async def scenario():
    async with running(server) as addr:
      url = f'ws://{addr}/api/chat'
      # Good sessions: 20 s of input each, sent up front, which the server plays at one frame
      # per 80 ms through the whole scenario. Nothing here depends on the machine's speed (real
      # pacing under load is experiments/load_serve.py's, injected-clock pacing
      # test_serve_clock.py's).
      good = [asyncio.create_task(converse(url, voice(40 + i, 250), pace=False)) for i in range(2)]
      assert await wait_for(lambda: sum(s is not None for s in server.frame_loop.slots) == 2)
      ends = {}
      for name, make, _ in bad_clients(addr):
        before = len(server.finished)
        raw = await asyncio.to_thread(make)
        assert raw.status == 101, name
        assert await wait_for(lambda before=before: len(server.finished) > before, 30), name
        ends[name] = server.finished[-1]
        raw.close()
      assert not any(t.done() for t in good), [s.reason for s in server.finished]
      return ends, await asyncio.gather(*good)

  ends, good = asyncio.run(scenario())
  for name, _, reason in bad_clients('x:0'):
    assert ends[name].reason.startswith(reason if reason else 'client'), (name, ends[name].reason)
    assert ends[name].slot in (2, 3), name
  assert ends['oversized'].close_code == 1009 and ends['malformed'].close_code == 1007
  assert ends['stalled'].frames_out < 75
  assert all(s is None for s in server.frame_loop.slots)  # every slot freed
  # The good sessions: every frame on time (no underrun while they had input), exact outputs.
  by_slot = {next(s.slot for s in server.finished if s.sid == c.session): c for c in good}
  assert sorted(by_slot) == [0, 1]
  for s in server.finished:
    if s.slot in (0, 1):
      assert s.frames_in == 250 and (s.underruns == 0 or s.first_underrun >= 250), s.summary()
  found = check_crosstalk(serve_pipeline, tiny_model.cfg, by_slot)
  assert found == {0: [], 1: []}, found
  assert all(c.frames_received == 249 for c in good)
  assert np.isfinite(np.concatenate([c.reply_pcm for c in good])).all()
