"""`flmjax serve`: many live full-duplex sessions on one model, over the official protocol.

  flmjax serve --checkpoint DIR --mimi PATH [--slots 16] [--host 127.0.0.1] [--port 8990]

--checkpoint: an official-layout dir (config.json + safetensors) or an orbax training run.
--mimi: a Mimi safetensors file or a directory with one (a config.json beside it selects a
reduced config, e.g. golden/mimi_small). Clients: `flmjax client`, or the official client.
"""
from __future__ import annotations

import logging
import os

from flmjax.cli import ArgumentParser, command


def _parser() -> ArgumentParser:
  from flmjax.decode.sampling import add_sampling_flags
  ap = ArgumentParser(prog='flmjax serve', description=__doc__.split('\n\n')[0])
  ap.add_argument('--checkpoint', required=True, help='official-layout dir or orbax run dir')
  ap.add_argument('--mimi', required=True, help='Mimi safetensors file or directory')
  ap.add_argument('--slots', type=int, default=16, help='concurrent sessions (batch rows)')
  ap.add_argument('--host', default='127.0.0.1', help='bind address (0.0.0.0 exposes it)')
  ap.add_argument('--port', type=int, default=8990)
  ap.add_argument('--auth-token', default=os.environ.get('FLMJAX_TOKEN'),
                  help='require "Authorization: Bearer TOKEN" or ?token=TOKEN '
                       '(default: $FLMJAX_TOKEN; unset = no auth)')
  ap.add_argument('--tokenizer', help='SentencePiece .model or tokenizer.json for the text')
  ap.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default=None)
  ap.add_argument('--max-len', type=int, default=None,
                  help='frames per session (KV cache; default the model\'s max positions)')
  ap.add_argument('--max-message-bytes', type=int, default=1 << 20)
  ap.add_argument('--max-buffer-s', type=float, default=30.0,
                  help='input audio buffered ahead before the socket stops being read')
  ap.add_argument('--max-queue-frames', type=int, default=50,
                  help='unsent reply messages before a client counts as a stalled reader')
  ap.add_argument('--idle-s', type=float, default=30.0, help='close a session silent this long')
  ap.add_argument('--greedy', action='store_true', help='argmax after the repetition penalty')
  add_sampling_flags(ap)
  return ap


def build_server(model, mimi, args):
  from flmjax.decode import SamplingConfig
  from flmjax.serve.pipeline import FramePipeline
  from flmjax.serve.server import Server
  from flmjax.serve.session import Limits
  sampling = SamplingConfig(greedy=args.greedy, **{
      f'{f}_{k}': getattr(args, f'{f}_{k}') for f in ('temp', 'top_k', 'top_p',
                                                        'repetition_penalty')
      for k in ('text', 'audio')})
  pipeline = FramePipeline(model, mimi, args.slots, sampling=sampling, max_len=args.max_len)
  pipeline.warmup()
  tokenizer = None
  if args.tokenizer:
    from flmjax.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
  limits = Limits(max_message_bytes=args.max_message_bytes, max_buffer_s=args.max_buffer_s,
                  max_queue_frames=args.max_queue_frames, idle_s=args.idle_s)
  return Server(pipeline, sampling=sampling, limits=limits, auth_token=args.auth_token,
                tokenizer=tokenizer)


@command('flmjax serve')
def main(argv: list[str]) -> int:
  ap = _parser()
  args = ap.parse_args(argv)
  if args.slots < 1:
    raise ValueError(f'--slots {args.slots}: need at least one session slot')
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s')
  log = logging.getLogger('flmjax.serve')
  log.setLevel(logging.INFO)  # one line per session (no per-request access log)
  from aiohttp import web
  from flmjax.codec import load_mimi
  from flmjax.decode.cli import load_model
  model = load_model(args.checkpoint, args.dtype)  # errors name the flag and the fix
  mimi = load_mimi(args.mimi)
  log.info('compiling the frame loop for %d slots', args.slots)
  server = build_server(model, mimi, args)
  log.info('serving ws://%s:%d/api/chat (%d slots%s)', args.host, args.port, args.slots,
           ', bearer token required' if args.auth_token else '')
  web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
  return 0
