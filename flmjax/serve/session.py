"""One websocket session: its audio streams, input buffer, bounded output queue and counters.

The frame loop never waits on a session: it takes a frame with `take_frame` (silence and an
underrun when the client is late) and hands replies to `push` (a full queue means the client
stopped reading: the session ends). A failure ends only its own session. A session that waits
in the server's queue has no slot (slot None): it reads and drops its client's audio meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import aiohttp
import numpy as np

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.clock import Clock

log = logging.getLogger('flmjax.serve')


@dataclasses.dataclass
class Limits:
  """Per-session limits.

  max_message_bytes: the largest websocket message (aiohttp closes with 1009 past it).
  max_buffer_s: input audio buffered ahead of the frame loop before the server stops reading the
    socket (TCP back-pressure).
  max_queue_frames, max_unsent_bytes: reply messages queued, or bytes waiting in the socket's
    write buffer once the kernel's (socket_send_buffer bytes) is full, before a client counts
    as a stalled reader.
  idle_s: how long a session may send no message once its buffered audio has run out.
  """

  max_message_bytes: int = 1 << 20
  max_buffer_s: float = 30.0
  max_queue_frames: int = 50
  max_unsent_bytes: int = 1 << 15
  socket_send_buffer: int = 1 << 16
  idle_s: float = 30.0


class Session:
  """codec: 'opus' (the official 0x01) or 'pcm16'; client: 'page' (the browser page) or 'api',
  for the metrics and the log; record: keep every frame the model got (`recorded`, including
  the silence of underruns), for tests and debugging. on_clip(stream): called for each input
  message ('input') or reply frame ('reply') clipped to [-1, 1] (the server's metric)."""

  def __init__(
    self,
    sid: str,
    slot: int | None,
    ws,
    cfg,
    sampling: SamplingConfig,
    limits: Limits,
    frame_size: int,
    peer: str = '?',
    tokenizer=None,
    transport=None,
    codec: str = 'opus',
    client: str = 'api',
    record: bool = False,
    clock: Clock | None = None,
    on_clip=None,
  ):
    self.sid, self.slot, self.ws, self.peer = sid, slot, ws, peer
    self.transport = transport
    self.sampling, self.limits, self.frame_size = sampling, limits, frame_size
    self.codec, self.client, self.clock = codec, client, clock or Clock()
    make_reader, make_writer = protocol.CODECS[codec]
    self.reader, self.writer = make_reader(), make_writer()
    self.recorded: list[np.ndarray] | None = [] if record else None
    self.place = 0  # place in the server's queue (1 = next), 0 once it holds a slot
    self.admitted = asyncio.Event()  # set when it holds a slot
    self.text = protocol.TextStream(cfg, tokenizer)
    self.chunks: collections.deque = collections.deque()  # decoded input pcm not yet framed
    self.buffered = 0
    self.queue: asyncio.Queue = asyncio.Queue(limits.max_queue_frames)
    self.room = asyncio.Event()
    self.room.set()
    self.started = False  # the LM slot is reset at the first tick with a full frame buffered
    self.closed = asyncio.Event()
    self.reason, self.close_code = '', 1000
    self.bad_audio = False  # ended by malformed or corrupted audio (counted in /metrics)
    self.frames_in = self.frames_out = self.underruns = 0
    self.first_underrun = -1  # session frame index of the first underrun
    self.clipped = {'input': 0, 'reply': 0}  # messages / reply frames clipped to [-1, 1]
    self.on_clip = on_clip
    self.queued = slot is None  # it waited in the server's queue for a slot
    self.connect_time = self.start_time = time.time()  # start: when it got its slot (`admit`)

  # ---- called by the frame loop (never awaits) ----------------------------------------------
  def has_frame(self) -> bool:
    return self.buffered >= self.frame_size

  def take_frame(self) -> np.ndarray:
    """The next [S] input frame, or silence (an underrun) when the client is late."""
    S = self.frame_size
    if self.buffered < S:
      if self.first_underrun < 0:
        self.first_underrun = self.frames_in + self.underruns
      self.underruns += 1
      frame = np.zeros((S,), np.float32)
      if self.recorded is not None:
        self.recorded.append(frame)
      return frame
    frame, filled = np.empty((S,), np.float32), 0
    while filled < S:  # only the chunks this frame needs: a client far ahead costs nothing
      chunk = self.chunks[0]
      take = min(S - filled, chunk.size)
      frame[filled : filled + take] = chunk[:take]
      if take == chunk.size:
        self.chunks.popleft()
      else:
        self.chunks[0] = chunk[take:]
      filled += take
    self.buffered -= S
    self.frames_in += 1
    if self.buffered < self.limits.max_buffer_s * protocol.SAMPLE_RATE:
      self.room.set()
    if self.recorded is not None:
      self.recorded.append(frame)
    return frame

  def push(self, pcm: np.ndarray, text_id: int) -> None:
    """Queues one reply frame (Opus) and its text messages."""
    self.deliver(*self.encode_reply(pcm, text_id))

  def encode_reply(self, pcm: np.ndarray, text_id: int) -> tuple[list[bytes], float]:
    """The CPU half of `push`: one reply frame -> (its messages: text first, then the audio,
    so a client holding reply frame k holds the text of frames <= k too; the peak before
    clipping). Touches only the session's text stream and writer, so it may run off the event
    loop (the frame loop's fan-out thread, their only user while it serves the session)."""
    pcm, peak = protocol.clip(pcm)  # a loud reply is played clipped, as any player would
    return self.text.add(text_id) + [bytes([protocol.AUDIO]) + self.writer.encode(pcm)], peak

  def deliver(self, messages: list[bytes], peak: float) -> None:
    """The event loop's half of `push`: queues one reply frame's messages (a client that stopped
    reading ends the session) and counts a clipped reply."""
    if peak > 1.0:
      self._clipped('reply', peak)
    unsent = self.transport.get_write_buffer_size() if self.transport is not None else 0
    if unsent > self.limits.max_unsent_bytes:
      self.end(f'stalled reader: {unsent} bytes unsent')
      return
    for message in messages:
      if self.queue.full():
        self.end(f'stalled reader: {self.queue.qsize()} reply messages unsent')
        return
      self.queue.put_nowait(message)
    self.frames_out += 1

  def _clipped(self, stream: str, peak: float) -> None:
    """Counts audio clipped to [-1, 1]; the session's first clip is logged, once."""
    if not any(self.clipped.values()):
      log.warning(
        'session %s: %s audio peaks at %.2f, past full scale: clipped to [-1, 1] and played '
        '(counted in flmjax_clipped_total; logged once per session)',
        self.sid,
        stream,
        peak,
      )
    self.clipped[stream] += 1
    if self.on_clip is not None:
      self.on_clip(stream)

  def end(self, reason: str, code: int = 1008) -> None:
    """Ends the session (first reason wins); `code` is the websocket close code to send."""
    if not self.closed.is_set():
      self.reason, self.close_code = reason, code
      self.closed.set()

  # ---- the session's own tasks --------------------------------------------------------------
  async def receive(self) -> None:
    """Reads the client's messages into the input buffer until the socket or the session ends."""
    ws = self.ws
    while not self.closed.is_set():
      await self.room.wait()  # back-pressure: stop reading while the buffer is full
      try:
        msg = await self.clock.wait_for(ws.receive(), self.limits.idle_s)
      except asyncio.TimeoutError:
        if self.buffered >= self.frame_size or self.slot is None:
          continue  # not idle: its sent-ahead audio plays, or it waits in the queue
        return self.end(f'idle: no message for {self.limits.idle_s:g} s')
      if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        return self.end('client closed', 1000)
      if msg.type == aiohttp.WSMsgType.ERROR:
        # aiohttp's WebSocketError carries the close code (1009 for an oversized message).
        return self.end(
          f'websocket error: {ws.exception()}', int(getattr(ws.exception(), 'code', 1002))
        )
      if msg.type != aiohttp.WSMsgType.BINARY:
        return self.end(f'expected binary messages, got {msg.type.name}', 1003)
      data = msg.data
      if not data:
        continue  # the official server skips empty messages too
      if data[0] != protocol.AUDIO:
        return self.end(f'unknown message kind {data[0]}', 1003)
      clipped = self.reader.clipped
      try:
        pcm = self.reader.decode(data[1:])
      except protocol.CorruptAudioError as e:  # never fed to the model
        self.bad_audio = True
        return self.end(f'corrupted audio: {e}', 1007)
      except Exception as e:  # sphn raises ValueError (and others) on a malformed stream
        self.bad_audio = True
        return self.end(f'malformed {"Opus" if self.codec == "opus" else self.codec}: {e}', 1007)
      if self.reader.clipped > clipped:  # loud, not corrupt: clipped and played
        self._clipped('input', self.reader.peak)
      if self.slot is None:
        continue  # queued: decoded (the Opus stream stays in sync), then dropped
      if pcm.size:
        self.chunks.append(pcm)
        self.buffered += pcm.size
        if self.buffered >= self.limits.max_buffer_s * protocol.SAMPLE_RATE:
          self.room.clear()

  async def send(self) -> None:
    """Drains the reply queue to the socket."""
    while True:
      message = await self.queue.get()
      await self.ws.send_bytes(message)

  def summary(self) -> str:
    """One log line; start is when the session got its slot, with its wait in the queue beside
    it (a session that left the queue never started: start is when it connected)."""
    hms = lambda t: time.strftime('%H:%M:%S', time.gmtime(t))
    now, wait = time.time(), ''
    if self.queued and self.admitted.is_set():
      wait = f' (queued {self.start_time - self.connect_time:.1f} s)'
    elif self.queued:
      wait = f' (queued {now - self.connect_time:.1f} s, never started)'
    clipped = (
      f', clipped in {self.clipped["input"]} out {self.clipped["reply"]}'
      if any(self.clipped.values())
      else ''
    )
    return (
      f'session {self.sid} slot {self.slot} peer {self.peer} ({self.client}): start '
      f'{hms(self.start_time)}{wait} end {hms(now)} '
      f'({now - self.start_time:.1f} s), frames in {self.frames_in} '
      f'out {self.frames_out}, underruns {self.underruns} (first at frame '
      f'{self.first_underrun}){clipped}, reason: {self.reason}'
    )
