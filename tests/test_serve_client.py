"""Loud audio is clipped and played, never refused; a client whose reply stream fails ends the
conversation at once and says why. No model: a Session on its own, and a fake server that
answers the first audio frame with a corrupted Ogg page."""

import asyncio
import logging
import types

import numpy as np
import pytest
from aiohttp import web
from serve_harness import FRAME, serving_in_thread, voice

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.client import ReplyStreamError, converse
from flmjax.serve.clock import ManualClock
from flmjax.serve.session import Limits, Session


def corrupt(message: bytes) -> bytes:
  """An Ogg page with its audio bytes flipped and its CRC field kept."""
  page = bytearray(message)
  body = 27 + page[26]
  for i in range(body, min(len(page), body + 40)):
    page[i] ^= 0x5A
  return bytes(page)


@pytest.mark.parametrize('peak', [1.0, 2.0, 4.0])
def test_loud_input_is_clipped_not_refused(peak):
  pcm = voice(4, 6)
  pcm = pcm * (peak / np.abs(pcm).max())
  writer, reader = protocol.OpusWriter(), protocol.OpusReader()
  out = np.concatenate(
    [reader.decode(writer.encode(pcm[i : i + FRAME])) for i in range(0, pcm.size, FRAME)]
  )
  assert out.size == pcm.size and np.isfinite(out).all() and np.abs(out).max() <= 1.0
  if peak > 1.0:  # Opus keeps the level: the decoded audio peaks past full scale, then clips
    assert reader.clipped >= 1 and reader.peak > 1.0
    assert np.abs(out).max() == 1.0
  # A CRC failure still ends the stream: loudness is no corruption, a broken page is.
  with pytest.raises(protocol.CorruptAudioError, match='fails its CRC check'):
    reader.decode(corrupt(writer.encode(pcm[:FRAME])))


def test_loud_reply_is_clipped_counted_and_logged_once(tiny_model, caplog):
  counted = []
  session = Session(
    'loud',
    0,
    ws=None,
    cfg=tiny_model.cfg,
    sampling=SamplingConfig(),
    limits=Limits(),
    frame_size=FRAME,
    on_clip=counted.append,
  )
  reply = voice(5, 3) * 20.0  # far past full scale
  with caplog.at_level(logging.WARNING, logger='flmjax.serve'):
    for i in range(3):
      session.push(reply[i * FRAME : (i + 1) * FRAME], tiny_model.cfg.text_wait_id)
  assert not session.closed.is_set() and session.frames_out == 3
  assert counted == ['reply'] * 3 and session.clipped == {'input': 0, 'reply': 3}
  [line] = [r.getMessage() for r in caplog.records]  # once per session
  assert 'session loud: reply audio peaks at' in line and 'clipped to [-1, 1]' in line
  reader = protocol.OpusReader()
  played = [reader.decode(session.queue.get_nowait()[1:]) for _ in range(3)]
  assert all(np.isfinite(p).all() and np.abs(p).max() <= 1.0 for p in played)
  assert 'clipped in 0 out 3' in session.summary()


def bad_reply_app(after: int) -> web.Application:
  """A server that handshakes, then answers its `after`-th audio frame with a corrupted page."""

  async def chat(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_bytes(bytes([protocol.HANDSHAKE]))
    writer, heard = protocol.OpusWriter(), 0
    async for _ in ws:
      heard += 1
      if heard == after:
        good = writer.encode(np.zeros(FRAME, np.float32))
        await ws.send_bytes(bytes([protocol.AUDIO]) + good)
        await ws.send_bytes(bytes([protocol.AUDIO]) + corrupt(writer.encode(voice(1, 1))))
    return ws

  app = web.Application()
  app.router.add_get('/api/chat', chat)
  return app


def test_a_failing_receive_ends_the_conversation_at_once():
  """The client paces on a clock that never moves: after its 3 lead frames the send loop waits
  for virtual time forever. The reply stream's failure must still end the conversation and
  reach the caller, with nothing more sent."""
  clock = ManualClock()

  async def scenario():
    runner = web.AppRunner(bad_reply_app(after=3))
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', 0).start()
    [(_, port)] = runner.addresses
    try:
      with pytest.raises(ReplyStreamError) as failed:
        await asyncio.wait_for(
          converse(f'ws://127.0.0.1:{port}/api/chat', voice(2, 20), lead_frames=3, clock=clock),
          120,  # a bound on a failing test only: the conversation ends without time moving
        )
      return failed.value
    finally:
      await runner.cleanup()

  error = asyncio.run(scenario())
  assert isinstance(error.__cause__, protocol.CorruptAudioError)
  assert 'the reply stream failed after 1 reply messages: CorruptAudioError: Ogg page' in str(error)
  assert clock.time() == 0.0


def test_client_cli_prints_one_line_when_the_reply_stream_fails(tmp_path, capsys):
  import soundfile

  from flmjax import cli

  soundfile.write(tmp_path / 'user.wav', voice(6, 8), 24000)
  server = types.SimpleNamespace(app=lambda: bad_reply_app(after=8))  # after the last frame
  with serving_in_thread(server) as addr:
    code = cli.main(
      [
        'client',
        '--url',
        f'ws://{addr}/api/chat',
        '--in',
        str(tmp_path / 'user.wav'),
        '--out',
        str(tmp_path / 'reply.wav'),
        '--no-pace',
      ]
    )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and len(err) == 1, err
  assert err[0].startswith(f'flmjax client: error: ws://{addr}/api/chat: the reply stream failed')
  assert 'CorruptAudioError' in err[0] and not (tmp_path / 'reply.wav').exists()


def test_client_cli_says_when_the_server_cut_the_session(tmp_path, capsys):
  """A server that closes with 1001 after two replies (a drain's deadline): the replies that
  arrived are written, and one stderr line gives the code, the server's reason, exit 1."""
  import soundfile

  from flmjax import cli

  async def chat(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_bytes(bytes([protocol.HANDSHAKE]))
    writer, heard = protocol.OpusWriter(), 0
    async for _ in ws:
      heard += 1
      if heard > 1:  # the model's first step is silent
        await ws.send_bytes(bytes([protocol.AUDIO]) + writer.encode(voice(7, 1)))
      if heard == 3:
        await ws.close(code=1001, message=b'server draining: the drain deadline passed')
    return ws

  app = web.Application()
  app.router.add_get('/api/chat', chat)
  soundfile.write(tmp_path / 'user.wav', voice(6, 8), 24000)
  with serving_in_thread(types.SimpleNamespace(app=lambda: app)) as addr:
    argv = ['client', '--url', f'ws://{addr}/api/chat', '--in', str(tmp_path / 'user.wav')]
    code = cli.main([*argv, '--out', str(tmp_path / 'reply.wav'), '--no-pace'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and len(err) == 1, err
  assert 'the server ended the session with 1001 (server draining: the drain deadline' in err[0]
  reply, rate = soundfile.read(tmp_path / 'reply.wav')
  assert rate == 24000 and reply.size == 2 * FRAME  # nothing that arrived is lost


def test_pre_encoded_input_is_sent_as_given():
  """converse(encoded=...) sends the payloads given (a load test encodes before the run): the
  same bytes a fresh writer makes as it goes; a list of the wrong length is refused."""
  pcm = voice(5, 6)
  writer = protocol.OpusWriter()
  encoded = [writer.encode(pcm[i * FRAME : (i + 1) * FRAME]) for i in range(6)]
  got = []

  async def chat(request):  # a server that records what it hears
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_bytes(bytes([protocol.HANDSHAKE]))
    async for msg in ws:
      got.append(msg.data)
    return ws

  async def scenario(**kw):
    app = web.Application()
    app.router.add_get('/api/chat', chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', 0).start()
    [(_, port)] = runner.addresses
    try:
      return await converse(f'ws://127.0.0.1:{port}/api/chat', pcm, pace=False, replies=0, **kw)
    finally:
      await runner.cleanup()

  own = asyncio.run(scenario())
  sent, got[:] = list(got), []
  given = asyncio.run(scenario(encoded=encoded))
  assert sent == got == [bytes([protocol.AUDIO]) + e for e in encoded]
  np.testing.assert_array_equal(own.sent_pcm, given.sent_pcm)
  with pytest.raises(ValueError, match='encoded: 5 payloads for 6 frames'):
    asyncio.run(scenario(encoded=encoded[:5]))
