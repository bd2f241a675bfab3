"""Replicas behind a load balancer: draining on SIGTERM, and an HAProxy agent-check port that
reports the free capacity.

Draining (`drain`): the server stops admitting (new sessions get 503, /healthz answers 503
"draining", the agent answers "drain"), sends its queued sessions away at once with close code
1013 ("try again later": they never got a slot, so nothing of theirs is lost and a reconnect
through the balancer reaches another replica), lets live sessions run up to `drain_s` seconds,
then closes those still open with 1001 ("going away"). `install` wires it to SIGTERM.

The agent (`start_agent`): HAProxy's agent-check connects to a TCP port and reads one line;
`agent_reply` answers "ready up P% maxconn:N", P the share of free places (slots and queue, at
least 1%) and N all places, or "drain" while draining. HAProxy scales the server's weight by P,
so a replica with more free slots gets more of the new sessions, and caps its connections at N.
"""

from __future__ import annotations

import asyncio
import signal

import prometheus_client as prom
from aiohttp.web_runner import GracefulExit

from flmjax.serve.session import log


class DrainMetrics:
  """The drain's counters, in the server's registry."""

  def __init__(self, registry):
    self.draining = prom.Gauge(
      'flmjax_draining',
      '1 while the server drains (SIGTERM): it admits no session',
      registry=registry,
    )
    self.refused = prom.Counter(
      'flmjax_drain_refused',
      'sessions refused with 503 because the server drains',
      registry=registry,
    )
    self.sent_away = prom.Counter(
      'flmjax_drain_sent_away',
      'queued sessions closed with 1013 (try again later) when the drain began',
      registry=registry,
    )
    self.cut = prom.Counter(
      'flmjax_drain_cut',
      'live sessions closed with 1001 when the drain time (--drain-s) ran out',
      registry=registry,
    )


async def drain(server, drain_s: float) -> int:
  """Drains `server` (a flmjax.serve.server.Server): returns once every session has ended and
  closed, at most drain_s seconds of server.clock (plus the closing handshakes) after the call.
  Returns how many live sessions were cut at the deadline."""
  server.draining = True
  server.drain_metrics.draining.set(1)
  live = [s for s in server.frame_loop.slots if s is not None]
  queued = list(server.waiting)
  for session in queued:
    session.end('server draining: no slot was given; reconnect to reach another replica', 1013)
  server.drain_metrics.sent_away.inc(len(queued))
  log.info(
    'draining: admitting no session; %d queued sent away (1013), %d live get up to %g s',
    len(queued),
    len(live),
    drain_s,
  )
  cut = 0
  try:
    await server.clock.wait_for(_handlers_done(server), drain_s)
  except asyncio.TimeoutError:
    for session in server.frame_loop.slots:
      if session is not None and not session.closed.is_set():
        session.end(f'server draining: the drain time of {drain_s:g} s (--drain-s) ran out', 1001)
        cut += 1
    server.drain_metrics.cut.inc(cut)
    await _handlers_done(server)
  log.info(
    'drained: %d live sessions finished, %d closed at the deadline (1001)', len(live) - cut, cut
  )
  return cut


async def _handlers_done(server) -> None:
  """Until every session handler (live, queued or closing) has returned."""
  while pending := {task for task in server.handling if not task.done()}:
    await asyncio.wait(pending)


def stop_run_app() -> None:
  """Ends `aiohttp.web.run_app` as its own SIGINT handler does: it cleans up and returns."""

  def stop():
    raise GracefulExit

  asyncio.get_running_loop().call_soon(stop)


def install(app, server, drain_s: float, on_drained=stop_run_app) -> None:
  """On SIGTERM, drains `server` and then calls on_drained() (by default `web.run_app` returns,
  and `flmjax serve` exits 0). Installed at the app's startup, after aiohttp's own SIGTERM
  handler, which it replaces; SIGINT still stops at once. A second SIGTERM while draining
  changes nothing."""

  tasks = []  # the drain task, held so that it is not collected while it runs

  async def on_startup(app) -> None:
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
      if server.draining:
        return
      tasks.append(loop.create_task(drain(server, drain_s)))
      tasks[-1].add_done_callback(lambda _: on_drained())

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)

  app.on_startup.append(on_startup)


def agent_reply(server) -> str:
  """One HAProxy agent-check answer: 'drain', or 'ready up P% maxconn:N'."""
  if server.draining:
    return 'drain\n'
  slots = len(server.frame_loop.slots)
  live = sum(s is not None for s in server.frame_loop.slots)
  places = slots + server.queue_size
  free = places - live - len(server.waiting)
  # Never 0%: weight 0 takes the server out, and a full replica must still get the sessions
  # HAProxy queued for it (its maxconn holds them back until a slot frees).
  percent = max(1, 100 * free // places)
  return f'ready up {percent}% maxconn:{places}\n'


def add_agent(app, server, sock) -> None:
  """Serves agent_reply on the listening socket `sock` for the app's lifetime."""

  async def answer(reader, writer) -> None:
    try:
      writer.write(agent_reply(server).encode())
      await writer.drain()
    except ConnectionError:
      pass
    finally:
      writer.close()

  agents = []

  async def on_startup(app) -> None:
    agents.append(await asyncio.start_server(answer, sock=sock))

  async def on_cleanup(app) -> None:
    for agent in agents:
      agent.close()
      await agent.wait_closed()

  app.on_startup.append(on_startup)
  app.on_cleanup.append(on_cleanup)
