"""What the browser page needs from `flmjax serve`, without a browser: the page and its assets
from the package only, the `?codec=pcm16` variant (exact against the offline replay), page
sessions counted apart in /metrics, `--queue N` (0: 503), settings windows <= 0, the text ids
sent, and the URL printed when ready. The real-browser test is tests/test_serve_browser.py.
"""

import asyncio
import re
import time

import aiohttp
import numpy as np
import pytest
from serve_harness import FRAME, converse, running, voice, wait_for
from yarl import URL

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.reference import mismatches, replay
from flmjax.serve.server import SESSION_HEADER, Server
from flmjax.serve.session import Limits

GREEDY = SamplingConfig(greedy=True)
TRAVERSALS = (
  '/../setup.cfg',
  '/static/../server.py',
  '/static/..%2fserver.py',
  '/static/%2e%2e/server.py',
  '/static/%2E%2E%2Fserver.py',
  '/%2e%2e/%2e%2e/etc/passwd',
  '/static/..%5cserver.py',
  '/static/page.py',
  '/static/',
  '/static/.%2e/cli.py',
  '/static/%252e%252e%252fserver.py',
  '/static//etc/passwd',
  '/index.html',
)


def test_page_and_assets_only_from_the_package(serve_pipeline):
  guarded = Server(serve_pipeline, sampling=GREEDY, auth_token='s3cret')
  server = Server(serve_pipeline, sampling=GREEDY)

  async def scenario():
    async with running(guarded) as addr, aiohttp.ClientSession() as http:
      got = {}
      for path in ('/', '/static/app.js', '/static/capture.js', '/?token=s3cret'):
        async with http.get(f'http://{addr}{path}') as r:  # the page holds no secret
          got[path] = (r.status, r.content_type, await r.text())
      async with http.get(f'http://{addr}/api/chat') as r:
        chat = r.status  # the websocket and the API still need the token
    async with running(server) as addr, aiohttp.ClientSession() as http:
      refused = {}
      for path in TRAVERSALS:  # as sent: yarl must not normalize the dots away first
        async with http.get(URL(f'http://{addr}{path}', encoded=True)) as r:
          refused[path] = r.status
      return got, refused, chat

  got, refused, chat = asyncio.run(scenario())
  status, kind, html = got['/']
  assert (status, kind) == (200, 'text/html') and 'id="transcript"' in html
  assert 'static/app.js' in html and 'http' not in html.replace('http-equiv', '')  # no CDN
  assert got['/static/app.js'][:2] == (200, 'text/javascript')
  assert "codec: 'pcm16'" in got['/static/app.js'][2]
  assert "registerProcessor('flmjax-capture'" in got['/static/capture.js'][2]
  assert got['/?token=s3cret'][2] == html
  assert refused == dict.fromkeys(TRAVERSALS, 404), refused
  assert chat == 401


def test_pcm16_page_session_is_exact_and_counted_apart(serve_pipeline, tiny_model):
  server = Server(serve_pipeline, sampling=GREEDY, record_input=True)

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      url = f'ws://{addr}/api/chat'
      page = await converse(url + '?client=page', voice(3, 10), pace=False, codec='pcm16')
      api = await converse(url, voice(4, 6), pace=False)
      async with http.ws_connect(url + '?client=page&codec=pcm16') as ws:
        hello = await ws.receive(timeout=10)
        sid = ws._response.headers[SESSION_HEADER]
        await ws.send_bytes(b'\x01' + bytes(3))  # 1.5 int16 samples
        await ws.receive(timeout=10)
      async with http.get(f'http://{addr}/api/chat?codec=mp3') as r:
        bad_codec = (r.status, (await r.json())['error'])
      async with http.get(f'http://{addr}/metrics') as r:
        metrics = await r.text()
      return page, api, hello.data, sid, bad_codec, metrics

  page, api, hello, sid, bad_codec, metrics = asyncio.run(scenario())
  assert hello == b'\x00' + sid.encode()  # a page learns its session id from the handshake
  ended = {s.sid: s for s in server.finished}
  assert ended[sid].reason.startswith('malformed pcm16') and ended[sid].close_code == 1007
  assert bad_codec[0] == 400 and 'pcm16' in bad_codec[1]
  # pcm16 carries the samples unchanged (up to int16): the model got exactly the sent frames.
  quantized = np.rint(voice(3, 10) * 32768).astype(np.int16) / np.float32(32768)
  np.testing.assert_array_equal(page.sent_pcm, quantized)
  recorded = np.concatenate(ended[page.session].recorded)  # then silence until it closed
  np.testing.assert_array_equal(recorded[: 10 * FRAME], quantized)
  ref = replay(serve_pipeline, {0: page.sent_pcm})
  assert page.frames_received == 9
  assert mismatches(page, tiny_model.cfg, *ref[0], codec='pcm16') == []
  assert (
    protocol.Pcm16Reader().decode(protocol.Pcm16Writer().encode(page.reply_pcm)).tolist()
    == page.reply_pcm.tolist()
  )  # the replies came as int16 too
  assert ended[api.session].client == 'api' and ended[page.session].client == 'page'
  assert 'flmjax_sessions_total{client="page"} 2.0' in metrics
  assert 'flmjax_sessions_total{client="api"} 1.0' in metrics


def test_queue_notices_places_then_admits(serve_pipeline, tiny_model):
  server = Server(serve_pipeline, sampling=GREEDY, queue=2, limits=Limits(idle_s=60))

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      url = f'ws://{addr}/api/chat'
      holders = []
      for _ in range(4):  # hold every slot: handshake, then silence
        holders.append(await http.ws_connect(url))
        assert (await holders[-1].receive(timeout=10)).data == b'\x00'
      first = await http.ws_connect(url)
      notices = {'first': [(await first.receive(timeout=10)).data]}
      seen = []
      second = asyncio.create_task(converse(url, voice(7, 8), pace=False, notice_hook=seen.append))
      assert await wait_for(lambda: len(seen) == 1)
      with pytest.raises(aiohttp.WSServerHandshakeError) as full:  # the queue is full
        await http.ws_connect(url)
      async with http.get(f'http://{addr}/metrics') as r:
        queued = [
          line
          for line in (await r.text()).splitlines()
          if line.startswith('flmjax_sessions_queued ')
        ]
      await first.close()  # leaves the queue: the second moves up
      assert await wait_for(lambda: len(seen) == 2)
      assert not second.done()
      freed = time.time()
      await holders[0].close()  # a slot frees: the second gets it
      conv = await asyncio.wait_for(second, 120)
      for ws in holders[1:]:
        await ws.close()
      return notices, seen, full.value.status, queued, conv, freed

  notices, seen, status, queued, conv, freed = asyncio.run(scenario())
  assert notices['first'] == [b'\x02server full: you are number 1 in the queue for a free slot\n']
  assert seen == [
    'server full: you are number 2 in the queue for a free slot\n',
    'server full: you are number 1 in the queue for a free slot\n',
  ]
  assert conv.notices == seen and status == 503 and queued == ['flmjax_sessions_queued 2.0']
  ended = {s.sid: s for s in server.finished}
  assert ended[conv.session].slot == 0 and ended[conv.session].frames_in == 8
  ref = replay(serve_pipeline, {0: conv.sent_pcm})
  assert conv.frames_received == 7 and mismatches(conv, tiny_model.cfg, *ref[0]) == []
  assert [s.reason for s in server.finished if s.slot is None] == ['client closed']
  # The log line's start is when the session got its slot, its wait in the queue beside it.
  admitted = ended[conv.session]
  assert admitted.connect_time < freed <= admitted.start_time
  assert re.search(r'start \d\d:\d\d:\d\d \(queued \d+\.\d s\) end ', admitted.summary())
  [left] = [s for s in server.finished if s.slot is None]
  assert re.search(r'\(queued \d+\.\d s, never started\)', left.summary())
  assert not server.waiting and all(s is None for s in server.frame_loop.slots)


def test_no_queue_answers_503_with_its_body(serve_pipeline):
  server = Server(serve_pipeline, sampling=GREEDY, limits=Limits(idle_s=60))  # --queue 0

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      url = f'ws://{addr}/api/chat'
      holders = [await http.ws_connect(url) for _ in range(4)]
      assert await wait_for(lambda: all(server.frame_loop.slots))
      with pytest.raises(aiohttp.WSServerHandshakeError) as full:
        await http.ws_connect(url)
      async with http.get(url) as r:
        body = (r.status, await r.json())
      for ws in holders:
        await ws.close()
      return full.value.status, body

  status, (plain, body) = asyncio.run(scenario())
  assert status == plain == 503
  assert body == {'error': 'server full: all 4 session slots are busy; retry later'}
  assert not server.waiting


def test_settings_window_zero_or_less_is_no_penalty(serve_pipeline):
  server = Server(serve_pipeline, sampling=GREEDY)
  assert SamplingConfig(penalty_window_text=0, penalty_window_audio=-1).penalty_buffer('audio') == 1

  async def scenario():
    async with running(server) as addr, aiohttp.ClientSession() as http:
      async with http.post(
        f'http://{addr}/api/settings',
        json={'repetition_penalty_window_text': -1, 'repetition_penalty_window_audio': 0},
      ) as r:
        return r.status, await r.json()

  status, body = asyncio.run(scenario())  # the official gradio slider goes down to -1
  assert status == 200 and body['settings']['repetition_penalty_window_text'] == -1
  assert (server.sampling.penalty_window_text, server.sampling.penalty_window_audio) == (-1, 0)


def test_text_ids_sent_and_dropped(tiny_model):
  """flmjax drops BOS, EOS and WAIT; the official server drops WAIT and ids 0 and 3 (moshi's
  text padding ids, which are ordinary text in FLM's vocabulary): flmjax sends those."""
  cfg = tiny_model.cfg
  text = protocol.TextStream(cfg)
  ids = (0, cfg.text_bos_id, 3, cfg.text_eos_id, 5, cfg.text_wait_id)
  assert [m for i in ids for m in text.add(i)] == [
    b'\x02<0>',
    b'\x02<3>',
    b'\x02<5>',
    protocol.SENTENCE_END,
  ]


def test_serve_prints_the_page_url_and_checks_queue(tiny_dir, golden_dir, monkeypatch, capsys):
  from aiohttp import web

  from flmjax import cli

  assert (
    cli.main(
      ['serve', '--checkpoint', str(tiny_dir), '--mimi', str(golden_dir / 'mimi'), '--queue', '-1']
    )
    == 1
  )
  assert 'flmjax serve: error: --queue -1' in capsys.readouterr().err
  started = []
  monkeypatch.setattr(
    'flmjax.serve.cli.build_server',
    lambda model, mimi, args, *mesh: started.append(args.queue) or Server.__new__(Server),
  )
  monkeypatch.setattr(Server, 'app', lambda self: web.Application())
  monkeypatch.setattr(web, 'run_app', lambda app, print, **kw: print('listening'))
  assert (
    cli.main(
      [
        'serve',
        '--checkpoint',
        str(tiny_dir),
        '--mimi',
        str(golden_dir / 'mimi_small'),
        '--port',
        '8991',
        '--queue',
        '3',
      ]
    )
    == 0
  )
  assert started == [3]
  assert 'open http://127.0.0.1:8991 to talk to it' in capsys.readouterr().out


def test_shutdown_leaves_no_active_row(serve_pipeline):
  """A session that left after the last tick must not stay active in the pipeline: the next
  server built on it (the tests share one) would step that row on."""
  serve_pipeline.start(np.array([True, False, False, False]))  # as if a session just left

  async def scenario():
    async with running(Server(serve_pipeline, sampling=GREEDY)):
      await asyncio.sleep(0.2)

  asyncio.run(scenario())
  assert not serve_pipeline.active.any()
