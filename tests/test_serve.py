"""`flmjax serve` against live loopback servers: the official protocol, settings, concurrent
sessions without cross-talk, slot reuse, auth, refusal when full.

One compiled pipeline (tiny LM, golden mimi_small, 4 slots, greedy) serves every test; clients
send their audio up front (no pacing), so no frame of real input is ever an underrun and each
session's replies must equal the offline replay exactly.
"""

import asyncio

import aiohttp
import numpy as np
import pytest
from serve_harness import (
  FRAME,
  check_crosstalk,
  converse,
  running,
  serving_in_thread,
  sessions_by_slot,
  voice,
  wait_for,
)

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.server import SESSION_HEADER, Server

GREEDY = SamplingConfig(greedy=True)


def test_settings_keys_and_text_stream(tiny_model):
  cfg = tiny_model.cfg
  s = protocol.apply_settings(
    GREEDY, {'use_sampling': True, 'temp_text': 0.7, 'repetition_penalty_window_audio': 20}
  )
  assert (s.greedy, s.temp_text, s.penalty_window_audio) == (False, 0.7, 20)
  assert protocol.settings_json(s)['use_sampling'] is True
  for bad, word in (
    ([1], 'JSON object'),
    ({'temp': 1}, "unknown setting 'temp'"),
    ({'top_k_text': 1.5}, 'integer'),
    ({'use_sampling': 1}, 'true or false'),
    ({'top_p_text': 2.0}, 'top_p'),
  ):
    with pytest.raises(ValueError, match=word):
      protocol.apply_settings(GREEDY, bad)
  text = protocol.TextStream(cfg)
  w = cfg.text_wait_id
  sent = [m for t in (w, 5, 7, w, w, cfg.text_bos_id, 9) for m in text.add(t)]
  assert sent == [b'\x02<5>', b'\x02<7>', protocol.SENTENCE_END, b'\x02<9>']


def test_protocol_handshake_audio_text_settings(serve_pipeline, tiny_model):
  cfg = tiny_model.cfg
  server = Server(serve_pipeline, sampling=GREEDY)

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      base = f'http://{addr}'
      async with http.post(f'{base}/api/settings', data=b'{not json') as r:
        assert r.status == 400 and (await r.json())['error'] == 'Invalid JSON'
      async with http.post(f'{base}/api/settings', json={'temp_txt': 1}) as r:
        assert r.status == 400 and 'temp_txt' in (await r.json())['error']
      # Server-wide (the official semantics): applies to sessions that start from now on.
      async with http.post(
        f'{base}/api/settings', json={'use_sampling': False, 'repetition_penalty_text': 1.05}
      ) as r:
        assert r.status == 200 and (await r.json())['settings']['repetition_penalty_text'] == 1.05
      assert server.sampling == SamplingConfig(greedy=True, repetition_penalty_text=1.05)
      async with http.post(f'{base}/api/settings?session=nope', json={}) as r:
        assert r.status == 404

      async def per_session(sid):  # ours: one live session's settings, by the id header
        # Windows past the default 50 (the official gradio slider goes to 100), even past the
        # session's 256 frames (then the whole session): the rings hold a whole session.
        body = {
          'repetition_penalty_audio': 1.3,
          'repetition_penalty_window_text': 100,
          'repetition_penalty_window_audio': 1000,
        }
        async with http.post(f'{base}/api/settings?session={sid}', json=body) as r:
          assert r.status == 200
          assert (await r.json())['settings']['repetition_penalty_window_text'] == 100
        assert server.frame_loop.find(sid).sampling.repetition_penalty_audio == 1.3

      conv = await converse(
        f'ws://{addr}/api/chat', voice(1, 12), pace=False, session_hook=per_session
      )
      async with http.get(f'{base}/healthz') as r:
        health = await r.json()
      async with http.get(f'{base}/metrics') as r:
        metrics = await r.text()
      return conv, health, metrics

  conv, health, metrics = asyncio.run(scenario())
  assert conv.session and conv.close_code == 1000
  assert conv.frames_sent == 12 and conv.frames_received == 11  # the first step returns nothing
  assert conv.reply_pcm.size == 11 * FRAME and np.abs(conv.reply_pcm).max() > 0
  assert conv.text and '\x02' not in conv.text and f'<{cfg.text_wait_id}>' not in conv.text
  assert health['status'] == 'ok' and health['slots'] == 4
  for name in (
    'flmjax_sessions_live',
    'flmjax_frame_loop_seconds_bucket',
    'flmjax_underruns_total',
    'flmjax_frame_loop_recent_seconds{quantile="0.99"}',
  ):
    assert name in metrics, name
  [done] = server.finished
  assert (done.frames_in, done.frames_out, done.reason) == (12, 11, 'client closed')
  # The session ran on the posted settings: the reference uses the same ones.
  sampling = SamplingConfig(
    greedy=True,
    repetition_penalty_text=1.05,
    repetition_penalty_audio=1.3,
    penalty_window_text=100,
    penalty_window_audio=1000,
  )
  assert done.sampling == sampling
  from flmjax.serve.reference import mismatches, replay

  ref = replay(serve_pipeline, {0: conv.sent_pcm}, sampling=sampling)
  assert mismatches(conv, cfg, *ref[0], frames=11) == []


def test_four_sessions_no_crosstalk(serve_pipeline, tiny_model):
  server = Server(serve_pipeline, sampling=GREEDY)
  frames = {0: 20, 1: 14, 2: 24, 3: 17}  # different lengths: sessions end at different ticks
  by_slot = sessions_by_slot(server, frames, first_seed=10)
  assert sorted(by_slot) == [0, 1, 2, 3]
  assert all(s.underruns == 0 or s.first_underrun >= s.frames_in for s in server.finished)
  found = check_crosstalk(serve_pipeline, tiny_model.cfg, by_slot)
  assert found == {slot: [] for slot in by_slot}, found
  assert all(c.frames_received == c.frames_sent - 1 for c in by_slot.values())


def compiled_sizes(pipeline) -> list[int]:
  """How many compilations each jitted call of the frame loop holds."""
  jits = [pipeline._frame, pipeline.mimi._reset] + list(
    pipeline.decoder._compiled(pipeline.slots).values()
  )
  return [f._cache_size() for f in jits]


def test_full_refuses_then_a_leaver_frees_its_slot(serve_pipeline, tiny_model):
  server = Server(serve_pipeline, sampling=GREEDY)
  compiled = compiled_sizes(serve_pipeline)

  async def scenario():
    async with running(server) as addr:
      url = f'ws://{addr}/api/chat'
      # Three long sessions and one that leaves after 8 replies (mid-stream, input still queued).
      stayers = [
        asyncio.create_task(converse(url, voice(20 + i, 40), pace=False)) for i in range(3)
      ]
      leaver = asyncio.create_task(converse(url, voice(30, 40), pace=False, replies=8))
      assert await wait_for(lambda: all(server.frame_loop.slots))
      async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
          await http.ws_connect(url)
        async with http.get(url) as r:
          body = await r.json()
      left = await leaver
      assert await wait_for(lambda: not all(server.frame_loop.slots))
      newcomer = await converse(url, voice(31, 10), pace=False)
      return refused.value.status, body, left, newcomer, await asyncio.gather(*stayers)

  status, body, left, newcomer, stayers = asyncio.run(scenario())
  assert status == 503 and 'all 4 session slots are busy' in body['error']
  assert left.frames_received >= 8
  ended = {s.sid: s for s in server.finished}
  assert ended[left.session].frames_in < 40  # it left with input still unsent to the model
  assert ended[newcomer.session].slot == ended[left.session].slot
  assert newcomer.frames_received == 9
  convs = {ended[c.session].slot: c for c in stayers}
  convs[ended[newcomer.session].slot] = newcomer
  found = check_crosstalk(serve_pipeline, tiny_model.cfg, convs)
  assert found == {slot: [] for slot in convs}, found
  assert compiled_sizes(serve_pipeline) == compiled  # joins and leaves never recompiled
  refused = server.frame_loop.metrics.registry.get_sample_value('flmjax_sessions_refused_total')
  assert refused == 2  # the websocket attempt and the plain GET


def test_auth_token_checked_before_upgrade(serve_pipeline):
  server = Server(serve_pipeline, sampling=GREEDY, auth_token='s3cret')

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      statuses = []
      for url, headers in (
        (f'ws://{addr}/api/chat', {}),
        (f'ws://{addr}/api/chat?token=wrong', {}),
        (f'ws://{addr}/api/chat', {'Authorization': 'Bearer wrong'}),
      ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
          await http.ws_connect(url, headers=headers)
        statuses.append(e.value.status)
      async with http.post(f'http://{addr}/api/settings', json={}) as r:
        statuses.append(r.status)
      async with http.get(f'http://{addr}/healthz') as r:
        statuses.append(r.status)  # open: a liveness probe carries no token
      for url, headers in (
        (f'ws://{addr}/api/chat?token=s3cret', {}),
        (f'ws://{addr}/api/chat', {'Authorization': 'Bearer s3cret'}),
      ):
        async with http.ws_connect(url, headers=headers) as ws:
          msg = await ws.receive(timeout=10)
          statuses.append(msg.data)
          assert ws._response.headers[SESSION_HEADER]
      return statuses

  assert asyncio.run(scenario()) == [401, 401, 401, 401, 200, b'\x00', b'\x00']
  assert not server.finished or all(s.frames_in == 0 for s in server.finished)


def test_cli_help_errors_and_client_end_to_end(serve_pipeline, tmp_path, capsys):
  import socket

  import soundfile

  from flmjax import cli

  assert cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert all(f'  {name} ' in out for name in ('serve', 'client'))
  for command, flag in (('serve', '--auth-token'), ('client', '--no-pace')):
    assert cli.main([command, '--help']) == 0
    assert flag in capsys.readouterr().out
  assert cli.main(['serve', '--checkpoint', str(tmp_path / 'nope'), '--mimi', str(tmp_path)]) == 1
  assert 'flmjax serve: error: --checkpoint' in capsys.readouterr().err
  assert (
    cli.main(['client', '--in', str(tmp_path / 'missing.wav'), '--out', str(tmp_path / 'r.wav')])
    == 1
  )
  assert 'flmjax client: error: --in' in capsys.readouterr().err
  soundfile.write(tmp_path / 'stereo.wav', np.zeros((1920, 2), np.float32), 24000)
  assert (
    cli.main(['client', '--in', str(tmp_path / 'stereo.wav'), '--out', str(tmp_path / 'r.wav')])
    == 1
  )  # never averaged: the user says which channel
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and '2 channels; give a mono WAV' in err[0], err
  assert not (tmp_path / 'r.wav').exists()

  # `flmjax client` against a live server (its own event loop, in a thread): WAV in, WAV out.
  soundfile.write(tmp_path / 'user.wav', voice(5, 8), 24000)  # 8 frames at 24 kHz
  # A port nobody listens on, held for the whole call: bound (so no other server on the box can
  # take it, and the client's own connection cannot be given it and connect to itself) but not
  # listening, so the connection is refused every time.
  with socket.socket() as closed:
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    assert (
      cli.main(
        [
          'client',
          '--url',
          f'ws://127.0.0.1:{port}/api/chat',
          '--in',
          str(tmp_path / 'user.wav'),
          '--out',
          str(tmp_path / 'reply.wav'),
        ]
      )
      == 1
    )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'flmjax client: error: ws://127.0.0.1:{port}/'), err
  assert 'Cannot connect' in err[0], err
  with serving_in_thread(Server(serve_pipeline, sampling=GREEDY)) as addr:
    assert (
      cli.main(
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
      == 0
    )
  reply, rate = soundfile.read(tmp_path / 'reply.wav', dtype='float32')
  assert rate == 24000 and reply.shape == (7 * FRAME,)
  assert (tmp_path / 'reply.txt').read_text().startswith('<')
  assert 'sent 8 frames, received 7' in capsys.readouterr().out


def test_session_length_limit_ends_only_that_session(serve_pipeline, tiny_model, monkeypatch):
  # The limit logic reads pipeline.max_len; lowering it (the KV cache stays 256) avoids a compile.
  monkeypatch.setattr(serve_pipeline, 'max_len', 8)
  server = Server(serve_pipeline, sampling=GREEDY)

  async def scenario():
    async with running(server) as addr:
      url = f'ws://{addr}/api/chat'
      long, short = await asyncio.gather(
        converse(url, voice(50, 20), pace=False), converse(url, voice(51, 6), pace=False)
      )
      return long, short

  long, short = asyncio.run(scenario())
  monkeypatch.undo()  # the replay runs the long session's whole input
  ended = {s.sid: s for s in server.finished}
  assert ended[long.session].reason == 'session length limit: 8 frames'
  assert long.close_code == 1000 and ended[long.session].frames_in == 8
  assert long.frames_received == 7 and short.frames_received == 5
  convs = {ended[c.session].slot: c for c in (long, short)}
  found = check_crosstalk(
    serve_pipeline, tiny_model.cfg, convs, frames={ended[long.session].slot: 7}
  )
  assert found == {slot: [] for slot in convs}, found


def test_idle_close_waits_for_buffered_audio(serve_pipeline):
  """The idle timer and the frame loop run on a ManualClock: the test decides when time passes,
  so the outcome depends on the order of events only, never on how fast the machine is."""
  from flmjax.serve.clock import ManualClock
  from flmjax.serve.session import Limits

  clock = ManualClock()
  server = Server(serve_pipeline, sampling=GREEDY, limits=Limits(idle_s=0.5), clock=clock)
  live = lambda: [s for s in server.frame_loop.slots if s is not None]

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      url = f'ws://{addr}/api/chat'
      async with http.ws_connect(url) as silent:  # handshake, then never a message
        assert (await silent.receive(timeout=10)).data == b'\x00'
        await clock.advance(0.49)
        assert not server.finished  # 490 ms without a message: not idle yet
        await clock.advance(0.02)
        closing = await silent.receive(timeout=10)
      # 1.6 s of audio at once, then nothing for over idle_s while it plays: not idle.
      talk = asyncio.create_task(converse(url, voice(60, 20), pace=False))
      assert await wait_for(lambda: any(s.buffered >= 20 * FRAME for s in live()))
      while not talk.done():  # time moves one frame at a time while input is buffered
        if any(s.buffered >= FRAME for s in live()):
          await clock.advance(0.08)
        await asyncio.sleep(0.01)
      return closing, silent.close_code, await talk

  closing, code, conv = asyncio.run(scenario())
  assert closing.type == aiohttp.WSMsgType.CLOSE and code == 1008
  assert clock.time() > 1.5  # the 20 frames played over 1.6 s of (virtual) time
  ended = {s.sid: s for s in server.finished}
  assert conv.frames_received == 19 and ended[conv.session].reason == 'client closed'
  assert [s.reason for s in server.finished if s.sid != conv.session] == [
    'idle: no message for 0.5 s'
  ]


def test_step_refuses_a_slot_at_max_len(serve_pipeline, monkeypatch):
  """The pipeline itself refuses to step a full slot (the frame loop ends it first), naming it."""
  monkeypatch.setattr(serve_pipeline, 'max_len', 1)
  pcm = np.zeros((serve_pipeline.slots, serve_pipeline.frame_size), np.float32)
  mask = np.array([False, True, False, False])
  serve_pipeline.start(mask)
  try:
    assert not serve_pipeline.at_limit().any()
    serve_pipeline.step(pcm)
    assert serve_pipeline.at_limit().tolist() == mask.tolist()
    with pytest.raises(ValueError, match=r'^slot\(s\) \[1\] reached max_len=1 frames: stop them'):
      serve_pipeline.step(pcm)
  finally:
    serve_pipeline.stop(mask)
