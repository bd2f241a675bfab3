"""`flmjax serve`: many live full-duplex sessions on one model, over the official protocol.

  flmjax serve --checkpoint DIR --mimi PATH [--slots 16] [--queue 0] [--host 127.0.0.1]
      [--port 8990] [--mesh data=2,tensor=4] [--drain-s 60] [--agent-port PORT]
      # then open http://127.0.0.1:8990 (the page) or use a client

--checkpoint: an official-layout dir (config.json + safetensors) or an orbax training run.
--mimi: a Mimi safetensors file or a directory with one (a config.json beside it selects a
reduced config, e.g. golden/mimi_small). Clients: `flmjax client`, or the official client.
SIGTERM drains (no new session; live ones get up to --drain-s, then 1001; exit 0); SIGINT stops
at once. Behind a load balancer: docs/serving.md.

  flmjax client --url ws://127.0.0.1:8990/api/chat --in user.wav --out reply.wav [--no-pace]
      [--codec opus|pcm16]

sends a mono WAV as Ogg/Opus in 80 ms frames (raw int16 samples with --codec pcm16, the page's
variant), in real time (or as fast as possible with --no-pace), and writes the reply audio (WAV)
and the monologue text (reply.txt).
"""

from __future__ import annotations

import logging
import math
import os
import sys

from flmjax.cli import ArgumentParser, command, fail

CLIENT_DOC = 'one session against a server: WAV in, reply WAV and text out'


def _address_parser() -> ArgumentParser:
  """--host and --port alone: parsed (and the port bound) before jax and the model load."""
  ap = ArgumentParser(prog='flmjax serve', add_help=False)
  ap.add_argument('--host', default='127.0.0.1', help='bind address (0.0.0.0 exposes it)')
  ap.add_argument('--port', type=int, default=8990, help='0 takes any free port')
  ap.add_argument(
    '--agent-port',
    type=int,
    default=None,
    help="an HAProxy agent-check port on --host: answers the free capacity ('ready up 50%% "
    "maxconn:16') or 'drain' (default: none)",
  )
  return ap


def _parser() -> ArgumentParser:
  from flmjax.decode.flags import add_kv_flags, add_sampling_flags

  ap = ArgumentParser(
    prog='flmjax serve', description=__doc__.split('\n\n')[0], parents=[_address_parser()]
  )
  ap.add_argument('--checkpoint', required=True, help='official-layout dir or orbax run dir')
  ap.add_argument(
    '--base',
    help="a LoRA run's base (the official checkpoint it trained on), where its init_from has moved",
  )
  ap.add_argument('--mimi', required=True, help='Mimi safetensors file or directory')
  ap.add_argument('--slots', type=int, default=16, help='concurrent sessions (batch rows)')
  ap.add_argument(
    '--queue',
    type=int,
    default=0,
    help='clients that may wait for a free slot (each told its place); '
    '0 = answer 503 when every slot is busy',
  )
  ap.add_argument(
    '--mesh',
    help='axis=size pairs, e.g. data=2,tensor=4: sessions over data '
    '(and fsdp), the model and KV cache over tensor (default: one device)',
  )
  ap.add_argument(
    '--auth-token',
    default=os.environ.get('FLMJAX_TOKEN'),
    help='require "Authorization: Bearer TOKEN" or ?token=TOKEN '
    '(default: $FLMJAX_TOKEN; unset = no auth)',
  )
  ap.add_argument('--tokenizer', help='SentencePiece .model or tokenizer.json for the text')
  ap.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default=None)
  ap.add_argument(
    '--max-len',
    type=int,
    default=None,
    help="frames per session (KV cache; default the model's max positions)",
  )
  ap.add_argument('--max-message-bytes', type=int, default=1 << 20)
  ap.add_argument(
    '--max-buffer-s',
    type=float,
    default=30.0,
    help='input audio buffered ahead before the socket stops being read',
  )
  ap.add_argument(
    '--max-queue-frames',
    type=int,
    default=50,
    help='unsent reply messages before a client counts as a stalled reader',
  )
  ap.add_argument('--idle-s', type=float, default=30.0, help='close a session silent this long')
  ap.add_argument(
    '--drain-s',
    type=float,
    default=60.0,
    help='on SIGTERM: admit no session, let live ones run up to this long, then close them '
    '(1001) and exit 0; queued ones are sent away at once (1013)',
  )
  ap.add_argument('--greedy', action='store_true', help='argmax after the repetition penalty')
  ap.add_argument(
    '--pallas',
    action='store_true',
    help='the depth transformer through the Pallas kernels (GPU: Triton, TPU: '
    'Mosaic), under --mesh in shard_map over the sessions',
  )
  add_kv_flags(
    ap,
    'a paged KV cache of N pages per layer shared by all slots (default: contiguous, '
    'max-len positions a slot); a session takes pages as it grows',
  )
  ap.add_argument(
    '--overflow',
    choices=('error', 'slide'),
    default='error',
    help='a session at max-len, or needing a page of a full pool: end it (error) or let it '
    'attend to the positions it holds (slide)',
  )
  add_sampling_flags(ap)
  return ap


# flag -> the least value it takes (every numeric flag of `flmjax serve`; floats must be finite).
# Below a frame of audio, or a KiB per message (one Opus page is a few hundred bytes), no session
# could run.
MINIMUMS = {
  '--slots': 1,
  '--queue': 0,
  '--max-len': 1,
  '--kv-pages': 1,
  '--page-size': 1,
  '--max-message-bytes': 1024,
  '--max-buffer-s': 0.08,
  '--max-queue-frames': 1,
  '--idle-s': 0.08,
  '--drain-s': 0,
}


def check_port(port: int, flag: str = '--port') -> None:
  if not 0 <= port <= 65535:
    raise ValueError(f'{flag} {port} must lie in 0..65535 (0: any free port)')


def check_flags(args) -> None:
  """Every numeric flag in range, before anything loads; ValueError naming the flag."""
  for flag, low in MINIMUMS.items():
    value = getattr(args, flag[2:].replace('-', '_'))
    if value is None:
      continue
    if not math.isfinite(value) or value < low:
      raise ValueError(
        f'{flag} {value:g} must be >= {low:g}' + (' (one 80 ms frame)' if low == 0.08 else '')
      )
  from flmjax.decode.flags import check_kv_dtype, sampling_from_flags

  sampling_from_flags(args)
  check_kv_dtype(args)
  if args.kv_pages is not None and args.max_len is not None and args.max_len % args.page_size:
    raise ValueError(f'--max-len {args.max_len} must be a multiple of --page-size {args.page_size}')
  if args.pallas:
    import jax

    if jax.default_backend() not in ('gpu', 'tpu'):
      raise ValueError(
        f'--pallas: the Pallas depth kernels compile for a GPU or a TPU, and this '
        f'host runs on {jax.default_backend()}; leave --pallas off here'
      )


# The frame loop's fan-out thread holds the GIL through its Opus calls (about 1 ms each): at the
# default 5 ms switch interval the frame thread and the event loop waited 10-17 ms for each
# GIL hand-back beside it (RESULTS.md, issue 26), at 1 ms 1-3 ms.
FAN_OUT_SWITCH_INTERVAL_S = 0.001


def build_server(model, mimi, args, mesh=None):
  from flmjax.decode.flags import sampling_from_flags
  from flmjax.serve.pipeline import FramePipeline
  from flmjax.serve.server import Server
  from flmjax.serve.session import Limits

  sampling = sampling_from_flags(args)
  pipeline = FramePipeline(
    model,
    mimi,
    args.slots,
    sampling=sampling,
    max_len=args.max_len,
    mesh=mesh,
    use_pallas=args.pallas,
    overflow=args.overflow,
    kv_pages=args.kv_pages,
    page_size=args.page_size,
    kv_dtype=args.kv_dtype,
  )
  pipeline.warmup()
  tokenizer = None
  if args.tokenizer:
    from flmjax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
  limits = Limits(
    max_message_bytes=args.max_message_bytes,
    max_buffer_s=args.max_buffer_s,
    max_queue_frames=args.max_queue_frames,
    idle_s=args.idle_s,
  )
  return Server(
    pipeline,
    sampling=sampling,
    limits=limits,
    auth_token=args.auth_token,
    tokenizer=tokenizer,
    queue=args.queue,
  )


# the library's argument names in its errors (flmjax.cli.spell) -> this command's flags
FLAGS = {
  name: '--' + name.replace('_', '-')
  for name in ('host', 'port', 'agent_port', 'slots', 'mesh', 'checkpoint', 'base', 'max_len')
}


@command('flmjax serve', FLAGS)
def main(argv: list[str]) -> int:
  sock = agent_sock = None
  if not {'-h', '--help'} & set(argv):  # a busy port fails at once, before jax and the model
    from flmjax.serve.net import bind_socket

    where, _ = _address_parser().parse_known_args(argv)
    check_port(where.port)
    if where.agent_port is not None:
      check_port(where.agent_port, '--agent-port')
    sock = bind_socket(where.host, where.port)
    if where.agent_port is not None:
      try:
        agent_sock = bind_socket(where.host, where.agent_port, '`agent_port`')
      except OSError:
        sock.close()
        raise
  try:
    args = _parser().parse_args(argv)
    check_flags(args)
    from flmjax.serve.pipeline import serving_mesh

    mesh = serving_mesh(args.mesh, args.slots)  # a mesh this host cannot make: before loading
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s')
    log = logging.getLogger('flmjax.serve')
    log.setLevel(logging.INFO)  # one line per session (no per-request access log)
    from aiohttp import web

    from flmjax.codec import load_mimi
    from flmjax.decode.session import load_model

    model = load_model(args.checkpoint, args.dtype, mesh, args.base, '--mimi')  # errors name flags
    mimi = load_mimi(args.mimi)
    log.info('compiling the frame loop for %d slots', args.slots)
    server = build_server(model, mimi, args, mesh)
    port = sock.getsockname()[1]
    log.info(
      'serving ws://%s:%d/api/chat (%d slots%s)',
      args.host,
      port,
      args.slots,
      ', bearer token required' if args.auth_token else '',
    )
    host = '127.0.0.1' if args.host in ('0.0.0.0', '', '::') else args.host
    host = f'[{host}]' if ':' in host else host
    ready = (
      f'open http://{host}:{port}'
      + ('/?token=TOKEN (the --auth-token)' if args.auth_token else '')
      + ' to talk to it'
    )
    from flmjax.serve import drain

    app = server.app()
    drain.install(app, server, args.drain_s)  # then web.run_app returns
    if agent_sock is not None:
      drain.add_agent(app, server, agent_sock)
      log.info('HAProxy agent-check on %s:%d', args.host, agent_sock.getsockname()[1])
    sys.setswitchinterval(FAN_OUT_SWITCH_INTERVAL_S)
    web.run_app(
      app, sock=sock, access_log=None, print=lambda _: print(ready, flush=True)
    )  # printed once the port listens
  finally:
    for s in (sock, agent_sock):
      if s is not None:
        s.close()
  return 0


def refused(url: str, status: int, message: str, token: str | None) -> str:
  """A refused websocket upgrade as one line that says what to do."""
  if status == 401:
    return (
      f'{url}: the server refused the --token (401 unauthorized); check the token'
      if token
      else f'{url}: the server needs a bearer token (401 unauthorized): pass '
      '--token TOKEN or set $FLMJAX_TOKEN'
    )
  if status == 503:
    return f'{url}: the server is full (503); retry later'
  return f'{url}: the server refused the session: {status} {message}'


@command('flmjax client', flags={'path': '--in', 'out': '--out'})
def client_main(argv: list[str]) -> int:
  """`flmjax client --in user.wav --out reply.wav`: one session against a server."""
  import asyncio

  import aiohttp

  from flmjax.outputs import check_out_file
  from flmjax.serve import protocol
  from flmjax.serve.client import ReplyStreamError, converse, read_wav

  ap = ArgumentParser(prog='flmjax client', description=CLIENT_DOC)
  ap.add_argument('--url', default='ws://127.0.0.1:8990/api/chat')
  ap.add_argument('--in', dest='input', required=True, help='the user side, a WAV file')
  ap.add_argument('--out', required=True, help='reply WAV (the text goes beside it, as .txt)')
  ap.add_argument('--no-pace', action='store_true', help='send as fast as possible')
  ap.add_argument(
    '--codec',
    choices=tuple(protocol.CODECS),
    default='opus',
    help='0x01 payload: Ogg/Opus (official) or raw int16 samples (pcm16)',
  )
  ap.add_argument(
    '--token', default=os.environ.get('FLMJAX_TOKEN'), help='bearer token (default: $FLMJAX_TOKEN)'
  )
  args = ap.parse_args(argv)
  pcm = read_wav(args.input)
  check_out_file(args.out, '.wav file')
  try:
    conv = asyncio.run(
      converse(
        args.url,
        pcm,
        pace=not args.no_pace,
        token=args.token,
        codec=args.codec,
        notice_hook=lambda t: print(t, end='', flush=True),
      )
    )
  except aiohttp.WSServerHandshakeError as e:
    return fail('flmjax client', refused(args.url, e.status, e.message, args.token))
  except ReplyStreamError as e:  # already names the url and the cause
    return fail('flmjax client', str(e))
  except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
    return fail('flmjax client', f'{args.url}: {type(e).__name__}: {e}')
  import soundfile

  base = os.path.splitext(args.out)[0]
  tmp = args.out + '.tmp.wav'
  soundfile.write(tmp, conv.reply_pcm, protocol.SAMPLE_RATE)
  os.replace(tmp, args.out)
  with open(base + '.txt', 'w') as f:
    f.write(conv.text + '\n')
  print(
    f'session {conv.session}: sent {conv.frames_sent} frames, received '
    f'{conv.frames_received}; wrote {args.out} and {base}.txt'
  )
  if conv.clipped:
    print(
      f'{conv.clipped} reply frames peaked past full scale (up to {conv.reply_peak:.2f}): '
      'clipped to [-1, 1]'
    )
  print(conv.text)
  if conv.close_code not in (None, 1000):  # cut short (a drain's deadline, a server error)
    reason = f' ({conv.close_reason})' if conv.close_reason else ''
    return fail(
      'flmjax client',
      f'{args.url}: the server ended the session with {conv.close_code}{reason} after '
      f'{conv.frames_received} reply frames; what arrived is in {args.out}',
    )
  return 0
