"""A client session against `flmjax serve` (or the official server), over the official protocol:
`converse` sends 24 kHz audio in 80 ms frames (Ogg/Opus, or raw int16 samples in the page's pcm16
variant) and collects the reply audio and text (`flmjax client` wraps it)."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import numpy as np

from flmjax.codec.base import FRAME_SIZE
from flmjax.data.audio import AudioError, read_audio
from flmjax.errors import FlmjaxError
from flmjax.serve import protocol
from flmjax.serve.clock import Clock

ENDS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class ReplyStreamError(FlmjaxError, ConnectionError):
  """The reply stream failed on the client's side (undecodable audio, a page that fails its CRC,
  non-finite samples, or any other error while receiving): the conversation ended there. The
  original exception is its __cause__."""


def read_wav(path: str) -> np.ndarray:
  """The user's side for a session: a mono WAV as float32 [samples] at 24 kHz, at least one 80 ms
  frame long. Several channels are an error: which one is the user's speech is the caller's to
  say, and averaging them is never right. Errors name `path` first."""
  try:
    (wave,) = read_audio(
      path,
      target_rate=protocol.SAMPLE_RATE,
      mono_fix="give a mono WAV (the user's speech only, e.g. `sox IN.wav OUT.wav remix 1`)",
    )
  except AudioError as e:
    raise AudioError(f'`path` {e}', e.reason) from None
  if wave.size < FRAME_SIZE:  # not one 80 ms frame: the session would "succeed" with nothing
    raise AudioError(
      f'`path` {path}: {wave.size / protocol.SAMPLE_RATE * 1000:.0f} ms of audio, shorter than '
      'one 80 ms frame; nothing to send'
    )
  return wave


@dataclasses.dataclass
class Conversation:
  """What one client session saw. sent_pcm: the input as the server decodes it (our own Opus
  bytes through a fresh decoder); reply_pcm: the reply audio; text: the 0x02 payloads joined,
  up to the last reply kept (a frame's text comes before its audio). clipped: reply messages
  that peaked past full scale (played clipped to [-1, 1]); reply_peak: the loudest sample before
  clipping."""

  session: str
  frames_sent: int
  frames_received: int
  sent_pcm: np.ndarray
  reply_pcm: np.ndarray
  text: str
  send_times: list
  receive_times: list
  close_code: int | None
  notices: list = dataclasses.field(default_factory=list)  # 0x02 before the handshake (queue)
  clipped: int = 0
  reply_peak: float = 0.0
  close_reason: str = ''  # the server's words when it closed first (e.g. a drain's deadline)


async def converse(
  url: str,
  pcm: np.ndarray,
  *,
  pace: bool = True,
  lead_frames: int = 0,
  token: str | None = None,
  replies: int | None = None,
  reply_timeout_s: float = 10.0,
  handshake_timeout_s: float = 30.0,
  session_hook=None,
  codec: str = 'opus',
  notice_hook=None,
  clock: Clock | None = None,
  encoded: list[bytes] | None = None,
) -> Conversation:
  """One session: sends pcm float32 [T] at 24 kHz in 1920-sample frames (the first lead_frames at
  once, then one per 80 ms when pacing), then waits until `replies` reply frames arrived (default:
  one per frame sent, less the model's first silent step) or reply_timeout_s passed, and closes.
  It keeps exactly those replies (fewer if the server ended the session first).
  session_hook(session_id) runs once the handshake arrived (e.g. to post settings).
  codec: 'opus' (the official protocol) or 'pcm16' (asks the server for the raw int16 variant).
  A server whose slots are busy may queue the session: its 0x02 notices (the place in the queue)
  come before the handshake, go to notice_hook(text), and the wait for a slot has no timeout.
  clock: what the pacing waits on and send/receive times read (real time by default).
  encoded: the frames' payloads, encoded beforehand by a fresh writer of `codec` (load tests,
  whose clients share the server's cores); by default each frame is encoded as it is sent.

  Loud replies are clipped to [-1, 1] and kept (Conversation.clipped counts them). Any failure
  while receiving ends the conversation at once, sending included, and raises ReplyStreamError.
  """
  clock = clock or Clock()
  frames = [pcm[i : i + FRAME_SIZE] for i in range(0, len(pcm) - FRAME_SIZE + 1, FRAME_SIZE)]
  want = max(len(frames) - 1, 0) if replies is None else replies
  if codec not in protocol.CODECS:
    raise ValueError(f'codec {codec!r}: known codecs are {", ".join(protocol.CODECS)}')
  if encoded is not None and len(encoded) != len(frames):
    raise ValueError(f'encoded: {len(encoded)} payloads for {len(frames)} frames')
  make_reader, make_writer = protocol.CODECS[codec]
  writer, own_reader, reply_reader = make_writer(), make_reader(), make_reader()
  if codec != 'opus':
    url += ('&' if '?' in url else '?') + f'codec={codec}'
  sent_pcm, reply_pcm, text = [], [], []
  send_times, receive_times = [], []
  headers = {'Authorization': f'Bearer {token}'} if token else {}
  async with aiohttp.ClientSession() as http:
    async with http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
      sid = ws._response.headers.get('X-Flmjax-Session', '')
      notices = []
      first = await ws.receive(timeout=handshake_timeout_s)
      while first.type == aiohttp.WSMsgType.BINARY and first.data[:1] == bytes([protocol.TEXT]):
        notices.append(first.data[1:].decode('utf-8'))
        if notice_hook is not None:
          notice_hook(notices[-1])
        first = await ws.receive()  # queued: as long as it takes
      if first.type == aiohttp.WSMsgType.CLOSE:  # e.g. 1013 from a draining server's queue
        raise ConnectionError(f'{url}: closed before the session began: {first.data} {first.extra}')
      if first.type != aiohttp.WSMsgType.BINARY or first.data[:1] != b'\x00':
        raise ConnectionError(
          f'{url}: expected the 0x00 handshake, got {first.type.name} {first.data!r:.60}'
        )
      if session_hook is not None:
        await session_hook(sid)
      got_all = asyncio.Event()
      if want == 0:
        got_all.set()

      received, close_reason = 0, ''

      async def receive():
        nonlocal received, close_reason
        while True:
          msg = await ws.receive()
          if msg.type in ENDS:  # as `async for` ends; the server's reason is kept
            close_reason = str(msg.extra or '') if msg.type == aiohttp.WSMsgType.CLOSE else ''
            return
          if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
            continue
          if msg.data[0] == protocol.AUDIO:
            out = reply_reader.decode(msg.data[1:])
            if out.size and not got_all.is_set():  # replies past `replies` are not kept
              reply_pcm.append(out)
              receive_times.append(clock.time())
              received += out.size
              if received >= want * FRAME_SIZE:
                got_all.set()
          elif msg.data[0] == protocol.TEXT and not got_all.is_set():
            text.append(msg.data[1:].decode('utf-8'))

      async def send():
        start = clock.time()
        for i, frame in enumerate(frames):
          if pace and i >= lead_frames:
            await clock.sleep_until(start + (i - lead_frames) * 0.08)
          if ws.closed:
            return  # the server ended the session
          data = writer.encode(frame) if encoded is None else encoded[i]
          try:
            await ws.send_bytes(bytes([protocol.AUDIO]) + data)
          except ConnectionError:
            return
          sent_pcm.append(own_reader.decode(data))
          send_times.append(clock.time())

      receiver, sender = asyncio.create_task(receive()), asyncio.create_task(send())
      replied = asyncio.create_task(got_all.wait())
      try:
        # Sending runs until its last frame, unless the receiver ends first: the server closed
        # (nothing more to send) or receiving failed (raised below, at once).
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done():
          sender.result()  # a failure of its own (ConnectionError is the server leaving)
          await asyncio.wait(
            {receiver, replied}, timeout=reply_timeout_s, return_when=asyncio.FIRST_COMPLETED
          )
        if receiver.done() and receiver.exception() is not None:
          e = receiver.exception()
          raise ReplyStreamError(
            f'{url}: the reply stream failed after {len(reply_pcm)} reply messages: '
            f'{type(e).__name__}: {e}'
          ) from e
      finally:
        sender.cancel()
        replied.cancel()
        await ws.close()  # the close handshake ends the receiver's loop (cancelled if not)
        receiver.cancel()
        await asyncio.gather(receiver, sender, replied, return_exceptions=True)
      code = ws.close_code
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.float32)
  reply = cat(reply_pcm)
  return Conversation(
    sid,
    len(send_times),
    reply.size // FRAME_SIZE,
    cat(sent_pcm),
    reply,
    ''.join(text),
    send_times,
    receive_times,
    code,
    notices,
    reply_reader.clipped,
    reply_reader.peak,
    close_reason,
  )
