"""Bad-input probes of `flmjax client` and `flmjax serve`'s flags (issue 22): one stderr line that
names the file or flag and what to do, exit status 1; the reply is never lost, a busy port is
reported before anything loads."""

import asyncio
import contextlib
import socket
import threading

import numpy as np
import pytest
import soundfile
from aiohttp import web
from probe import error_line

from flmjax.codec.base import FRAME_SIZE as FRAME


@pytest.fixture
def wavs(tmp_path):
  tone = (0.1 * np.sin(np.arange(4 * FRAME) / 10)).astype(np.float32)
  soundfile.write(tmp_path / 'stereo.wav', np.stack([tone, tone], 1), 24000)
  soundfile.write(tmp_path / 'empty.wav', np.zeros((0,), np.float32), 24000)
  soundfile.write(tmp_path / 'short.wav', tone[:1000], 24000)
  soundfile.write(tmp_path / 'mono.wav', tone, 24000)
  (tmp_path / 'cut.wav').write_bytes((tmp_path / 'mono.wav').read_bytes()[:-4000])
  return tmp_path


def client(capsys, *args):
  return error_line(capsys, 'client', '--url', 'ws://127.0.0.1:9/api/chat', *args)


@pytest.mark.parametrize(
  'name, message',
  [
    ('stereo.wav', '--in {d}/stereo.wav: 2 channels; give a mono WAV'),
    ('empty.wav', '--in {d}/empty.wav: the audio holds no samples'),  # data.audio's check
    (
      'short.wav',
      '--in {d}/short.wav: 42 ms of audio, shorter than one 80 ms frame; nothing to send',
    ),
    (
      'cut.wav',
      '--in {d}/cut.wav: truncated WAV: its header says 15360 bytes of audio, the '
      'file holds 11360; copy or export the file again',
    ),
  ],
  ids=['stereo', 'empty', 'short', 'cut'],
)
def test_client_bad_wav(capsys, wavs, name, message):
  # The url has no server: a WAV error comes first, before any connection.
  line = client(capsys, '--in', wavs / name, '--out', wavs / 'reply.wav')
  assert message.format(d=wavs) in line, line


def test_client_out_checked_before_connecting(capsys, wavs):
  line = client(capsys, '--in', wavs / 'mono.wav', '--out', wavs / 'nope' / 'reply.wav')
  assert (
    f'--out {wavs}/nope/reply.wav: the folder {wavs}/nope does not exist; create it first' in line
  )
  assert 'is a directory; give a .wav file path' in client(
    capsys, '--in', wavs / 'mono.wav', '--out', wavs
  )
  assert not (wavs / 'nope').exists()


@contextlib.contextmanager
def refusing(status: int):
  """A server on a free loopback port that answers every request with `status`, as `flmjax serve`
  does for a missing token (401) or when full (503)."""

  async def handle(request):
    return web.json_response({'error': 'refused'}, status=status)

  ready, stop, addr = threading.Event(), [], []

  def serve():
    loop = asyncio.new_event_loop()

    async def body():
      app = web.Application()
      app.router.add_get('/api/chat', handle)
      runner = web.AppRunner(app, handle_signals=False)
      await runner.setup()
      site = web.TCPSite(runner, '127.0.0.1', 0)
      await site.start()
      addr.append(site._server.sockets[0].getsockname()[1])
      stop.append(loop.create_future())
      ready.set()
      await stop[0]
      await runner.cleanup()

    loop.run_until_complete(body())
    loop.close()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  assert ready.wait(30)
  try:
    yield f'ws://127.0.0.1:{addr[0]}/api/chat'
  finally:
    stop[0].get_loop().call_soon_threadsafe(stop[0].set_result, None)
    thread.join(30)


def test_client_names_the_token_on_401(capsys, wavs, monkeypatch):
  monkeypatch.delenv('FLMJAX_TOKEN', raising=False)
  run = ('client', '--in', wavs / 'mono.wav', '--out', wavs / 'reply.wav', '--no-pace')
  with refusing(401) as url:
    line = error_line(capsys, *run, '--url', url)
    assert (
      'the server needs a bearer token (401 unauthorized): pass --token TOKEN or set '
      '$FLMJAX_TOKEN' in line
    )
    line = error_line(capsys, *run, '--url', url, '--token', 'wrong')
    assert 'the server refused the --token (401 unauthorized); check the token' in line
  with refusing(503) as url:
    assert 'the server is full (503); retry later' in error_line(capsys, *run, '--url', url)
  assert not (wavs / 'reply.wav').exists()


# ---- serve: every numeric flag checked before anything loads --------------------------------

SERVE = ('serve', '--checkpoint', '/nonexistent/ckpt', '--mimi', '/nonexistent/mimi')
ANY_PORT = ('--port', '0')  # the port is bound first: never depend on 8990 being free


@pytest.mark.parametrize(
  'flags, message',
  [
    (('--idle-s', '-1'), '--idle-s -1 must be >= 0.08 (one 80 ms frame)'),
    (('--idle-s', 'nan'), '--idle-s nan must be >= 0.08'),
    (('--max-len', '0'), '--max-len 0 must be >= 1'),
    (('--slots', '0'), '--slots 0 must be >= 1'),
    (('--port', '-5'), '--port -5 must lie in 0..65535 (0: any free port)'),
    (('--port', '70000'), '--port 70000 must lie in 0..65535'),
    (('--max-message-bytes', '10'), '--max-message-bytes 10 must be >= 1024'),
    (('--max-buffer-s', 'inf'), '--max-buffer-s inf must be >= 0.08'),
    (('--max-queue-frames', '0'), '--max-queue-frames 0 must be >= 1'),
    (('--temp-text', '-1'), '--temp-text -1.0: temperature must be >= 0'),
    (('--top-p-audio', '2'), '--top-p-audio 2.0: top_p must lie in [0, 1]'),
    (('--repetition-penalty-text', '0.5'), '--repetition-penalty-text 0.5: the official'),
    (
      ('--pallas',),
      '--pallas: the Pallas depth kernels compile for a GPU or a TPU, and this host runs on cpu',
    ),
    (('--kv-pages', '0'), '--kv-pages 0 must be >= 1'),
    (('--kv-dtype', 'int8'), '--kv-dtype int8 needs --kv-pages N (int8 is paged-only)'),
    (
      ('--kv-pages', '8', '--max-len', '100'),
      '--max-len 100 must be a multiple of --page-size 128',
    ),
  ],
  ids=[
    'idle_negative',
    'idle_nan',
    'max_len',
    'slots',
    'port_negative',
    'port_high',
    'message_bytes',
    'buffer_inf',
    'queue',
    'temp',
    'top_p',
    'penalty',
    'pallas_on_cpu',
    'kv_pages',
    'int8_contiguous',
    'max_len_pages',
  ],
)
def test_serve_numeric_flags(capsys, flags, message):
  # The checkpoint does not exist: the flag error comes first, before any loading.
  line = error_line(capsys, *SERVE, *ANY_PORT, *flags)
  assert line.startswith('flmjax serve: error: ') and message in line, line


def test_serve_busy_port_fails_before_loading(capsys):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    line = error_line(capsys, *SERVE, '--port', port)
  # The checkpoint is missing too: the port is what failed, so nothing was loaded first.
  assert (
    f'--host 127.0.0.1 --port {port}: cannot listen: the port is in use (another server?); '
    'pass another --port' in line
  )
  line = error_line(capsys, *SERVE, *ANY_PORT, '--host', 'no-such-host.invalid')
  assert '--host no-such-host.invalid: cannot resolve it' in line
  # A free port: binding succeeds, then the missing checkpoint is reported (and the port freed).
  line = error_line(capsys, *SERVE, '--port', '0')
  assert '--checkpoint' in line and '/nonexistent/ckpt' in line


# ---- smaller surfaces: aot --mesh, load_mimi, the model's positions --------------------------


def test_aot_mesh_sizes_must_be_positive():
  from flmjax.aot.request import AotError, parse_mesh

  for text in ('fsdp=0', 'tensor=0', 'fsdp=4,tensor=-2'):
    with pytest.raises(AotError, match=r'mesh sizes must be >= 1'):
      parse_mesh(text)
  with pytest.raises(AotError, match='expected comma-separated axis=size pairs'):
    parse_mesh('fsdp:4')
  assert parse_mesh('fsdp=4,tensor=2') == {'fsdp': 4, 'tensor': 2}


def test_aot_cli_mesh_zero(capsys):
  line = error_line(capsys, 'aot', '--topology', 'v5p:2x2x1', '--mesh', 'fsdp=0')
  assert "--mesh 'fsdp=0': fsdp=0: mesh sizes must be >= 1" in line


def test_load_mimi_blames_num_codebooks(golden_dir):
  from flmjax.codec import load_mimi

  with pytest.raises(
    ValueError,
    match=r'load_mimi: num_codebooks=99 is more than the 8 codebooks '
    r'of .*mimi_small.*; pass 1..8',
  ):
    load_mimi(str(golden_dir / 'mimi_small'), num_codebooks=99)
  with pytest.raises(ValueError, match=r'load_mimi: num_codebooks=0 must be an integer >= 1'):
    load_mimi(str(golden_dir / 'mimi_small'), num_codebooks=0)
  assert load_mimi(str(golden_dir / 'mimi_small'), num_codebooks=4).cfg.num_codebooks == 4


def test_model_rejects_more_frames_than_positions(tiny_model):
  limit = tiny_model.cfg.max_position_embeddings
  t = limit + 1
  text, codes = np.zeros((1, t), np.int32), np.zeros((1, t, 8), np.int32)
  with pytest.raises(
    ValueError,
    match=f'FLMAudio: {t} frames exceed max_position_embeddings '
    f'{limit}; split the sequence into windows',
  ):
    tiny_model(text, codes, codes)
  short = np.zeros((1, 2), np.int32), np.zeros((1, 2, 8), np.int32)
  with pytest.raises(
    ValueError, match=f'FLMAudio: positions holds {limit}, outside 0..{limit - 1}'
  ):
    tiny_model(short[0], short[1], short[1], positions=np.array([[0, limit]]))


# ---- serve: a corrupted page, an over-size message ----------------------------------------


def _corrupt_payload(message: bytes) -> bytes:
  """One Ogg page's audio bytes flipped, its header (and CRC field) kept: what a broken client or
  proxy sends. sphn decodes such a page into noise without a word."""
  page = bytearray(message)
  body = 27 + page[26]
  for i in range(body, min(len(page), body + 40)):
    page[i] ^= 0x5A
  return bytes(page)


@pytest.mark.slow
def test_serve_closes_corrupted_and_oversized_sessions_with_a_reason(serve_pipeline):
  import aiohttp
  from serve_harness import running, voice

  from flmjax.decode import SamplingConfig
  from flmjax.serve import protocol
  from flmjax.serve.server import Server
  from flmjax.serve.session import Limits

  server = Server(
    serve_pipeline,
    sampling=SamplingConfig(greedy=True),
    limits=Limits(max_message_bytes=4096, idle_s=60),
  )
  writer, pcm = protocol.OpusWriter(), voice(7, 6)
  messages = [b'\x01' + writer.encode(pcm[i * FRAME : (i + 1) * FRAME]) for i in range(6)]

  async def session(url, sends):
    async with aiohttp.ClientSession() as http:
      async with http.ws_connect(url) as ws:
        assert (await ws.receive(timeout=30)).data == b'\x00'
        for data in sends:
          await ws.send_bytes(data)
        msg = await ws.receive(timeout=30)
        while msg.type != aiohttp.WSMsgType.CLOSE:  # replies to the good frames come first
          assert msg.type == aiohttp.WSMsgType.BINARY, msg
          msg = await ws.receive(timeout=30)
        return msg.data, msg.extra  # the close code and reason

  async def scenario():
    async with running(server) as addr:
      url = f'ws://{addr}/api/chat'
      corrupted = await session(url, messages[:3] + [b'\x01' + _corrupt_payload(messages[3][1:])])
      oversized = await session(url, [b'\x01' + bytes(5000)])
      async with aiohttp.ClientSession() as http:
        async with http.get(f'http://{addr}/metrics') as r:
          return corrupted, oversized, await r.text()

  corrupted, oversized, metrics = asyncio.run(scenario())
  assert corrupted[0] == 1007 and corrupted[1].startswith('corrupted audio: Ogg page '), corrupted
  assert corrupted[1].endswith('fails its CRC check'), corrupted
  assert oversized == (1009, 'message too big: the limit is 4096 bytes (--max-message-bytes)')
  assert 'flmjax_bad_audio_sessions_total 1.0' in metrics
  reasons = [s.reason for s in server.finished]
  assert reasons[0].startswith('corrupted audio: Ogg page') and server.finished[0].frames_in <= 3
  assert reasons[1].startswith('websocket error:'), reasons


def test_opus_reader_checks_pages_and_pcm():
  from serve_harness import voice

  from flmjax.serve import protocol

  writer, pcm = protocol.OpusWriter(), voice(3, 4)
  pages = [writer.encode(pcm[i * FRAME : (i + 1) * FRAME]) for i in range(4)]
  reader = protocol.OpusReader()
  blob = b''.join(pages)
  out = [reader.decode(blob[i : i + 97]) for i in range(0, len(blob), 97)]  # pages split anyhow
  assert sum(o.size for o in out) == sum(protocol.OpusReader().decode(p).size for p in pages)
  reader = protocol.OpusReader()
  reader.decode(pages[0])
  with pytest.raises(protocol.CorruptAudioError, match=r'Ogg page \d+ fails its CRC check'):
    reader.decode(_corrupt_payload(pages[1]))
  # The CRC itself, against the Ogg spec's: a page with its CRC field zeroed hashes to it.
  message = pages[2]  # one or more pages: take the first
  page = message[: 27 + message[26] + sum(message[27 : 27 + message[26]])]
  assert protocol.ogg_crc(page[:22] + bytes(4) + page[26:]) == int.from_bytes(page[22:26], 'little')


# ---- issue 25 §4: --mesh sizes, a Mimi checkpoint as --checkpoint ---------------------------


@pytest.mark.parametrize(
  'mesh, message',
  [
    ('data=0', "--mesh 'data=0': data=0: mesh sizes must be >= 1"),
    ('tensor=-1', "--mesh 'tensor=-1': tensor=-1: mesh sizes must be >= 1"),
    ('data=2,fsdp=0', "--mesh 'data=2,fsdp=0': fsdp=0: mesh sizes must be >= 1"),
    ('data=2,data=2', 'expected comma-separated axis=size pairs with axes data, fsdp and tensor'),
    ('model=2', 'expected comma-separated axis=size pairs with axes data, fsdp and tensor'),
  ],
  ids=['data_zero', 'tensor_negative', 'fsdp_zero', 'repeated', 'unknown_axis'],
)
def test_serve_mesh_sizes(capsys, mesh, message):
  """The same parser (flmjax.sharding.parse_axes) as `aot --mesh`, before anything loads."""
  assert message in error_line(capsys, *SERVE, *ANY_PORT, '--mesh', mesh)


def test_one_mesh_parser_for_serve_and_aot():
  from flmjax import sharding as shd
  from flmjax.aot.request import AotError, parse_mesh

  with pytest.raises(ValueError, match=r"`mesh` 'tensor=-1': tensor=-1: mesh sizes must be >= 1"):
    shd.parse_axes('tensor=-1')
  with pytest.raises(AotError, match=r"'data=2': expected .* with axes fsdp and tensor"):
    parse_mesh('data=2')  # aot's data axis takes the remaining devices
  assert shd.parse_axes(' data = 2 ,tensor=4') == {'data': 2, 'tensor': 4}


def test_serve_checkpoint_of_another_kind(capsys, golden_dir, tmp_path):
  for mimi in (golden_dir / 'mimi_small', golden_dir / 'mimi_small' / 'mimi.safetensors'):
    line = error_line(capsys, 'serve', '--checkpoint', mimi, '--mimi', mimi, *ANY_PORT)
    assert (
      f'--checkpoint {mimi} is a Mimi codec checkpoint (the audio tokenizer), not an FLM-Audio '
      'model; pass it as --mimi, and here the model (config.json + model.safetensors, or a '
      'training run)' in line
    )
  tiny = golden_dir / 'flm_tiny'
  line = error_line(capsys, 'serve', '--checkpoint', tiny, '--mimi', tiny, *ANY_PORT)
  assert (
    f'{tiny} is an FLM-Audio model checkpoint, not the Mimi codec; give it as --checkpoint, '
    'and as the codec the Mimi .safetensors (or its folder)' in line
  )
