"""The aiohttp application: the official routes (GET /api/chat, POST /api/settings) plus
GET /healthz and GET /metrics, an optional bearer token checked before any upgrade, and the
frame loop's lifetime tied to the app's.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import socket
import uuid

from aiohttp import web

from flmjax.decode import SamplingConfig
from flmjax.serve import protocol
from flmjax.serve.frame_loop import FrameLoop
from flmjax.serve.pipeline import FramePipeline
from flmjax.serve.session import Limits, Session, log

SESSION_HEADER = 'X-Flmjax-Session'  # the session id, for POST /api/settings?session=ID
OPEN_PATHS = ('/healthz',)


class Server:

  def __init__(self, pipeline: FramePipeline, *, sampling: SamplingConfig | None = None,
               limits: Limits | None = None, auth_token: str | None = None, tokenizer=None,
               period_s: float = 0.08):
    self.pipeline = pipeline
    self.cfg = pipeline.cfg
    self.sampling = sampling or pipeline.decoder.sampling  # for sessions that start from now on
    self.limits = limits or Limits()
    self.auth_token, self.tokenizer = auth_token, tokenizer
    self.frame_loop = FrameLoop(pipeline, period_s=period_s)
    self.finished = collections.deque(maxlen=1000)  # the last ended sessions (tests, debugging)

  def app(self) -> web.Application:
    app = web.Application(middlewares=[self._auth], client_max_size=self.limits.max_message_bytes)
    app.router.add_get('/api/chat', self.handle_chat)
    app.router.add_post('/api/settings', self.handle_settings)
    app.router.add_get('/healthz', self.handle_healthz)
    app.router.add_get('/metrics', self.handle_metrics)
    app.on_startup.append(self._on_startup)
    app.on_shutdown.append(self._on_shutdown)
    return app

  async def _on_startup(self, app) -> None:
    self.frame_loop.start()

  async def _on_shutdown(self, app) -> None:
    for s in list(self.frame_loop.slots):
      if s is not None:
        s.end('server shutting down', 1001)
    await self.frame_loop.stop()

  @web.middleware
  async def _auth(self, request, handler):
    if self.auth_token is not None and request.path not in OPEN_PATHS:
      header = request.headers.get('Authorization', '')
      given = header[7:] if header.startswith('Bearer ') else request.query.get('token', '')
      if not hmac.compare_digest(given.encode(), self.auth_token.encode()):
        return web.json_response({'error': 'unauthorized: send "Authorization: Bearer TOKEN" '
                                           'or ?token=TOKEN'}, status=401)
    return await handler(request)

  # ---- routes -------------------------------------------------------------------------------
  async def handle_chat(self, request: web.Request):
    loop = self.frame_loop
    slot = loop.claim()
    if slot is None:
      loop.metrics.refused.inc()
      return web.json_response({'error': f'server full: all {len(loop.slots)} session slots are '
                                         f'busy; retry later'}, status=503)
    sock = request.transport.get_extra_info('socket') if request.transport else None
    if sock is not None:  # bounds what a client that stops reading can hold in the kernel
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.socket_send_buffer)
    sid = uuid.uuid4().hex[:12]
    ws = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes)
    ws.headers[SESSION_HEADER] = sid
    session = Session(sid, slot, ws, self.cfg, self.sampling, self.limits,
                      self.pipeline.frame_size, peer=str(request.remote), tokenizer=self.tokenizer,
                      transport=request.transport)
    loop.join(session)  # before the first await: the slot is ours
    tasks = []
    try:
      await ws.prepare(request)
      await ws.send_bytes(bytes([protocol.HANDSHAKE]))
      tasks = [asyncio.create_task(session.receive()), asyncio.create_task(session.send())]
      ended = asyncio.create_task(session.closed.wait())
      done, _ = await asyncio.wait(tasks + [ended], return_when=asyncio.FIRST_COMPLETED)
      for task in done:
        if task is not ended and task.exception() is not None:
          session.end(f'client vanished: {type(task.exception()).__name__}: '
                      f'{task.exception()}', 1011)
      ended.cancel()
    except ConnectionError as e:
      session.end(f'client vanished: {type(e).__name__}', 1011)
    except asyncio.CancelledError:
      session.end('cancelled (server shutting down)', 1001)
      raise
    finally:
      loop.leave(session)
      for task in tasks:
        task.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)  # no receive() left behind
      await self._close(request, ws, session)
      self.finished.append(session)
      log.info(session.summary())
    return ws

  async def _close(self, request, ws, session: Session) -> None:
    """Closes with the session's code and reason; a peer that does not read gets cut off."""
    if ws.closed or not ws.prepared:
      return
    try:
      await asyncio.wait_for(ws.close(code=session.close_code,
                                      message=session.reason.encode()[:120]), 1.0)
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
    return web.json_response({'status': 'ok', 'slots': len(loop.slots), 'live_sessions': live,
                              'ticks': loop.ticks})

  async def handle_metrics(self, request: web.Request):
    return web.Response(body=self.frame_loop.metrics.text(),
                        headers={'Content-Type': 'text/plain; version=0.0.4; charset=utf-8'})
