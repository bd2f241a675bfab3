"""`flmjax client`: talks to `flmjax serve` (or the official server) over the official protocol.

  flmjax client --url ws://127.0.0.1:8990/api/chat --in user.wav --out reply.wav [--no-pace]

Sends the WAV as Ogg/Opus in 80 ms frames, in real time (or as fast as possible with
--no-pace), and writes the reply audio (WAV) and the monologue text (reply.txt).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import aiohttp
import numpy as np

from flmjax.cli import ArgumentParser, command, fail
from flmjax.serve import protocol

FRAME = 1920


@dataclasses.dataclass
class Conversation:
  """What one client session saw. sent_pcm: the input as the server decodes it (our own Opus
  bytes through a fresh decoder); reply_pcm: the reply audio; text: the 0x02 payloads joined."""
  session: str
  frames_sent: int
  frames_received: int
  sent_pcm: np.ndarray
  reply_pcm: np.ndarray
  text: str
  send_times: list
  receive_times: list
  close_code: int | None


async def converse(url: str, pcm: np.ndarray, *, pace: bool = True, lead_frames: int = 0,
                   token: str | None = None, replies: int | None = None,
                   reply_timeout_s: float = 10.0, handshake_timeout_s: float = 30.0,
                   session_hook=None) -> Conversation:
  """One session: sends pcm float32 [T] at 24 kHz in 1920-sample frames (the first lead_frames at
  once, then one per 80 ms when pacing), then waits until `replies` reply frames arrived (default:
  one per frame sent, less the model's first silent step) or reply_timeout_s passed, and closes.
  It keeps exactly those replies (fewer if the server ended the session first).
  session_hook(session_id) runs once the handshake arrived (e.g. to post settings)."""
  frames = [pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]
  want = max(len(frames) - 1, 0) if replies is None else replies
  writer, own_reader, reply_reader = (protocol.OpusWriter(), protocol.OpusReader(),
                                      protocol.OpusReader())
  sent_pcm, reply_pcm, text = [], [], []
  send_times, receive_times = [], []
  headers = {'Authorization': f'Bearer {token}'} if token else {}
  async with aiohttp.ClientSession() as http:
    async with http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
      sid = ws._response.headers.get('X-Flmjax-Session', '')
      first = await ws.receive(timeout=handshake_timeout_s)
      if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != b'\x00':
        raise ConnectionError(f'{url}: expected the 0x00 handshake, got {first.type.name} '
                              f'{first.data!r:.60}')
      if session_hook is not None:
        await session_hook(sid)
      got_all = asyncio.Event()
      if want == 0:
        got_all.set()

      received = 0

      async def receive():
        nonlocal received
        async for msg in ws:
          if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
            continue
          if msg.data[0] == protocol.AUDIO:
            out = reply_reader.decode(msg.data[1:])
            if out.size and not got_all.is_set():  # replies past `replies` are not kept
              reply_pcm.append(out)
              receive_times.append(time.perf_counter())
              received += out.size
              if received >= want * FRAME:
                got_all.set()
          elif msg.data[0] == protocol.TEXT:
            text.append(msg.data[1:].decode('utf-8'))
        got_all.set()  # the server closed the session

      receiver = asyncio.create_task(receive())
      start = time.perf_counter()
      for i, frame in enumerate(frames):
        if pace and i >= lead_frames:
          await asyncio.sleep(max(0.0, start + (i - lead_frames) * 0.08 - time.perf_counter()))
        if receiver.done() or ws.closed:
          break  # the server ended the session
        data = writer.encode(frame)
        try:
          await ws.send_bytes(bytes([protocol.AUDIO]) + data)
        except ConnectionError:
          break
        sent_pcm.append(own_reader.decode(data))
        send_times.append(time.perf_counter())
      try:
        await asyncio.wait_for(got_all.wait(), reply_timeout_s)
      except asyncio.TimeoutError:
        pass
      await ws.close()
      receiver.cancel()
      code = ws.close_code
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.float32)
  reply = cat(reply_pcm)
  return Conversation(sid, len(send_times), reply.size // FRAME, cat(sent_pcm), reply,
                      ''.join(text), send_times, receive_times, code)


def read_wav(path: str) -> np.ndarray:
  """A WAV as mono float32 at 24 kHz."""
  import soundfile
  import soxr
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--in {path}: no such file')
  try:
    wave, rate = soundfile.read(path, dtype='float32', always_2d=True)
  except RuntimeError as e:  # soundfile's LibsndfileError
    raise ValueError(f'--in {path}: not a readable WAV ({e})') from None
  wave = wave.mean(axis=1)
  return soxr.resample(wave, rate, protocol.SAMPLE_RATE).astype(np.float32) if (
      rate != protocol.SAMPLE_RATE) else wave


@command('flmjax client')
def main(argv: list[str]) -> int:
  ap = ArgumentParser(prog='flmjax client', description=__doc__.split('\n\n')[0])
  ap.add_argument('--url', default='ws://127.0.0.1:8990/api/chat')
  ap.add_argument('--in', dest='input', required=True, help='the user side, a WAV file')
  ap.add_argument('--out', required=True, help='reply WAV (the text goes beside it, as .txt)')
  ap.add_argument('--no-pace', action='store_true', help='send as fast as possible')
  ap.add_argument('--token', default=os.environ.get('FLMJAX_TOKEN'),
                  help='bearer token (default: $FLMJAX_TOKEN)')
  args = ap.parse_args(argv)
  pcm = read_wav(args.input)
  try:
    conv = asyncio.run(converse(args.url, pcm, pace=not args.no_pace, token=args.token))
  except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
    return fail('flmjax client', f'{args.url}: {type(e).__name__}: {e}')
  import soundfile
  base = os.path.splitext(args.out)[0]
  tmp = args.out + '.tmp.wav'
  soundfile.write(tmp, conv.reply_pcm, protocol.SAMPLE_RATE)
  os.replace(tmp, args.out)
  with open(base + '.txt', 'w') as f:
    f.write(conv.text + '\n')
  print(f'session {conv.session}: sent {conv.frames_sent} frames, received '
        f'{conv.frames_received}; wrote {args.out} and {base}.txt')
  print(conv.text)
  return 0
