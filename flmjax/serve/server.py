"""The aiohttp application: the official routes (GET /api/chat, POST /api/settings) plus the
browser page at `/`, GET /healthz and GET /metrics, an optional bearer token checked before any
upgrade, an optional queue for clients that find every slot busy, and the frame loop's lifetime
tied to the app's. A draining server (flmjax.serve.drain) admits no session and answers /healthz
with 503.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import socket
import time
import uuid

from aiohttp import web

from flmjax.decode import SamplingConfig
from flmjax.serve import page, protocol
from flmjax.serve.clock import Clock
from flmjax.serve.drain import DrainMetrics
from flmjax.serve.frame_loop import FrameLoop
from flmjax.serve.pipeline import FramePipeline
from flmjax.serve.session import Limits, Session, log

SESSION_HEADER = 'X-Flmjax-Session'  # the session id, for POST /api/settings?session=ID
OPEN_PATHS = ('/healthz',)


class _WebSocket(web.WebSocketResponse):
  """aiohttp closes an over-size message with 1009 and no reason, before the session sees it:
  give the reason."""

  def __init__(self, max_msg_size: int):
    super().__init__(max_msg_size=max_msg_size)
    self.limit = max_msg_size

  async def close(self, *, code: int = 1000, message: bytes = b'', drain: bool = True) -> bool:
    if code == 1009 and not message:
      message = f'message too big: the limit is {self.limit} bytes (--max-message-bytes)'.encode()
    return await super().close(code=code, message=message, drain=drain)


class Server:
  """queue: how many clients may wait, upgraded, for a free slot (0: refuse with 503 at once).
  record_input: sessions keep the frames the model got (Session.recorded), for tests.
  clock: what the frame loop's ticks and the sessions' idle timers wait on (real time by default;
  tests pass a flmjax.serve.clock.ManualClock)."""

  def __init__(
    self,
    pipeline: FramePipeline,
    *,
    sampling: SamplingConfig | None = None,
    limits: Limits | None = None,
    auth_token: str | None = None,
    tokenizer=None,
    period_s: float = 0.08,
    queue: int = 0,
    record_input: bool = False,
    clock: Clock | None = None,
  ):
    if queue < 0:
      raise ValueError(f'queue={queue}: need 0 (no queue) or more')
    self.pipeline = pipeline
    self.cfg = pipeline.cfg
    self.sampling = sampling or pipeline.decoder.sampling  # for sessions that start from now on
    self.limits = limits or Limits()
    self.auth_token, self.tokenizer = auth_token, tokenizer
    self.clock = clock or Clock()
    self.frame_loop = FrameLoop(pipeline, period_s=period_s, clock=self.clock)
    self.finished = collections.deque(maxlen=1000)  # the last ended sessions (tests, debugging)
    self.queue_size, self.record_input = queue, record_input
    self.waiting: list[Session] = []  # queued sessions, first come first served
    self.frame_loop.metrics.queued.set_function(lambda: len(self.waiting))
    self.draining = False  # set by flmjax.serve.drain.drain: no session is admitted any more
    self.handling: set[asyncio.Task] = set()  # session handlers under way (the drain awaits them)
    self.drain_metrics = DrainMetrics(self.frame_loop.metrics.registry)

  def app(self) -> web.Application:
    app = web.Application(middlewares=[self._auth], client_max_size=self.limits.max_message_bytes)
    app.router.add_get('/api/chat', self.handle_chat)
    app.router.add_post('/api/settings', self.handle_settings)
    app.router.add_get('/healthz', self.handle_healthz)
    app.router.add_get('/metrics', self.handle_metrics)
    page.add_routes(app)
    app.on_startup.append(self._on_startup)
    app.on_shutdown.append(self._on_shutdown)
    return app

  async def _on_startup(self, app) -> None:
    self.frame_loop.start()

  async def _on_shutdown(self, app) -> None:
    for s in list(self.frame_loop.slots) + self.waiting:
      if s is not None:
        s.end('server shutting down', 1001)
    await self.frame_loop.stop()

  @web.middleware
  async def _auth(self, request, handler):
    if self.auth_token is not None and not (
      request.path in OPEN_PATHS or page.is_open(request.path)
    ):
      header = request.headers.get('Authorization', '')
      given = header[7:] if header.startswith('Bearer ') else request.query.get('token', '')
      if not hmac.compare_digest(given.encode(), self.auth_token.encode()):
        return web.json_response(
          {'error': 'unauthorized: send "Authorization: Bearer TOKEN" or ?token=TOKEN'}, status=401
        )
    return await handler(request)

  # ---- routes -------------------------------------------------------------------------------
  async def handle_chat(self, request: web.Request):
    """The session: `?codec=pcm16` swaps the 0x01 payload for raw int16 samples; `?client=page`
    (the browser page) counts apart in /metrics and gets its session id in the handshake."""
    loop = self.frame_loop
    codec = request.query.get('codec', 'opus')
    if codec not in protocol.CODECS:
      return web.json_response(
        {'error': f'codec={codec!r}: known codecs are {", ".join(protocol.CODECS)}'}, status=400
      )
    if self.draining:
      self.drain_metrics.refused.inc()
      return web.json_response(
        {'error': 'server draining (shutting down): retry; a load balancer sends you elsewhere'},
        status=503,
      )
    ws = _WebSocket(max_msg_size=self.limits.max_message_bytes)
    upgrade = ws.can_prepare(request).ok
    slot = loop.claim()
    if slot is None and (not upgrade or len(self.waiting) >= self.queue_size):
      loop.metrics.refused.inc()
      return web.json_response(
        {
          'error': f'server full: all {len(loop.slots)} session slots are '
          f'busy{self._queue_words()}; retry later'
        },
        status=503,
      )
    if not upgrade:
      return web.json_response({'error': 'GET /api/chat upgrades to a websocket'}, status=400)
    sock = request.transport.get_extra_info('socket') if request.transport else None
    if sock is not None:  # bounds what a client that stops reading can hold in the kernel
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.socket_send_buffer)
    sid = uuid.uuid4().hex[:12]
    ws.headers[SESSION_HEADER] = sid
    session = Session(
      sid,
      slot,
      ws,
      self.cfg,
      self.sampling,
      self.limits,
      self.pipeline.frame_size,
      peer=str(request.remote),
      tokenizer=self.tokenizer,
      transport=request.transport,
      codec=codec,
      client='page' if request.query.get('client') == 'page' else 'api',
      record=self.record_input,
      clock=self.clock,
      on_clip=lambda stream: loop.metrics.clipped.labels(stream).inc(),
    )
    self.handling.add(asyncio.current_task())
    if slot is None:
      self.waiting.append(session)
    else:
      self._join(session)  # before the first await: the slot is ours
    tasks = []
    try:
      await ws.prepare(request)
      tasks = [asyncio.create_task(session.receive()), asyncio.create_task(session.send())]
      ended = asyncio.create_task(session.closed.wait())
      if slot is None:
        self._announce_places()
        admitted = asyncio.create_task(session.admitted.wait())
        await asyncio.wait(tasks + [ended, admitted], return_when=asyncio.FIRST_COMPLETED)
        admitted.cancel()
      if session.admitted.is_set() and not session.closed.is_set():
        done, _ = await asyncio.wait(tasks + [ended], return_when=asyncio.FIRST_COMPLETED)
      else:
        done = {t for t in tasks if t.done()}
      for task in done:
        if task is not ended and task.exception() is not None:
          session.end(
            f'client vanished: {type(task.exception()).__name__}: {task.exception()}', 1011
          )
      ended.cancel()
    except ConnectionError as e:
      session.end(f'client vanished: {type(e).__name__}', 1011)
    except asyncio.CancelledError:
      session.end('cancelled (server shutting down)', 1001)
      raise
    finally:
      if session in self.waiting:
        self.waiting.remove(session)
        session.end('left the queue', 1000)  # unless it already ended with a reason
      loop.leave(session)
      self._admit()
      for task in tasks:
        task.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)  # no receive() left behind
      await self._close(request, ws, session)
      if session.bad_audio:
        loop.metrics.bad_audio.inc()
      self.finished.append(session)
      log.info(session.summary())
      self.handling.discard(asyncio.current_task())
    return ws

  def _join(self, session: Session) -> None:
    """Gives the session its slot and queues its handshake (the page's carries its id)."""
    self.frame_loop.join(session)
    session.start_time = time.time()  # the log's start: a queued session starts now
    session.place = 0
    session.admitted.set()
    if session.queue.full():  # queue notices it never read
      session.end(f'stalled reader: {session.queue.qsize()} messages unsent')
      return
    session.queue.put_nowait(
      bytes([protocol.HANDSHAKE]) + (session.sid.encode() if session.client == 'page' else b'')
    )

  def _admit(self) -> None:
    """Hands free slots to the queue's first sessions (synchronously: nobody overtakes them)."""
    while self.waiting and (slot := self.frame_loop.claim()) is not None:
      session = self.waiting.pop(0)
      if session.closed.is_set():
        continue
      session.slot = slot
      self._join(session)
    self._announce_places()

  def _announce_places(self) -> None:
    """A 0x02 notice to each queued session whose place changed."""
    for place, session in enumerate(self.waiting, 1):
      if session.place != place and not session.queue.full():
        session.place = place
        session.queue.put_nowait(
          bytes([protocol.TEXT])
          + (f'server full: you are number {place} in the queue for a free slot\n').encode()
        )

  def _queue_words(self) -> str:
    return f' and the queue of {self.queue_size} is full' if self.queue_size else ''

  async def _close(self, request, ws, session: Session) -> None:
    """Closes with the session's code and reason; a peer that does not read gets cut off."""
    if ws.closed or not ws.prepared:
      return
    try:
      await asyncio.wait_for(
        ws.close(code=session.close_code, message=session.reason.encode()[:120]), 1.0
      )
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
      if request.transport is not None:
        request.transport.abort()

  async def handle_settings(self, request: web.Request):
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      return web.json_response({'error': 'Invalid JSON'}, status=400)
    sid = request.query.get('session')
    session = None
    if sid is not None:
      session = self.frame_loop.find(sid)
      if session is None:
        return web.json_response({'error': f'no live session {sid!r}'}, status=404)
    try:
      sampling = protocol.apply_settings(session.sampling if session else self.sampling, body)
      self.pipeline.check_sampling(sampling)
    except ValueError as e:
      return web.json_response({'error': str(e)}, status=400)
    if session is not None:
      self.frame_loop.update_sampling(session, sampling)
    else:
      self.sampling = sampling
    return web.json_response({'status': 'success', 'settings': protocol.settings_json(sampling)})

  async def handle_healthz(self, request: web.Request):
    loop = self.frame_loop
    live = sum(s is not None for s in loop.slots)
    return web.json_response(
      {
        'status': 'draining' if self.draining else 'ok',
        'slots': len(loop.slots),
        'free_slots': 0 if self.draining else len(loop.slots) - live,
        'live_sessions': live,
        'queued': len(self.waiting),
        'ticks': loop.ticks,
      },
      status=503 if self.draining else 200,  # a balancer's health check stops routing here
    )

  async def handle_metrics(self, request: web.Request):
    return web.Response(
      body=self.frame_loop.metrics.text(),
      headers={'Content-Type': 'text/plain; version=0.0.4; charset=utf-8'},
    )
