"""Helpers for the server tests: a live server on a free loopback port, speech-like input, a raw
websocket client that can misbehave, and the offline cross-talk check."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct

import numpy as np
from aiohttp import web

from flmjax.codec.base import FRAME_SIZE
from flmjax.serve import client
from flmjax.serve.reference import mismatches, replay
from flmjax.serve.server import Server

FRAME = FRAME_SIZE  # samples per 80 ms frame


def converse(url: str, pcm: np.ndarray, **kw):
  """client.converse, waiting up to 120 s for the replies (not 10 s): it returns as soon as every
  reply is in, so the bound only decides how long a failing test takes, and a loaded box that
  serves slower than real time still gets every reply."""
  kw.setdefault('reply_timeout_s', 120.0)
  return client.converse(url, pcm, **kw)


@contextlib.asynccontextmanager
async def running(server: Server):
  """Serves `server` on 127.0.0.1 at a free port; yields 'host:port'."""
  runner = web.AppRunner(server.app(), handle_signals=False)
  await runner.setup()
  site = web.TCPSite(runner, '127.0.0.1', 0)
  await site.start()
  [(_, port)] = runner.addresses  # the port the kernel chose
  try:
    yield f'127.0.0.1:{port}'
  finally:
    await runner.cleanup()


def voice(seed: int, frames: int) -> np.ndarray:
  """[frames*1920] float32: a vowel-like harmonic signal with a seed-dependent pitch and a
  syllable envelope, so Opus keeps most of it and sessions differ."""
  rng = np.random.default_rng(seed)
  t = np.arange(frames * FRAME) / 24000
  f0 = 110 + 40 * rng.random()
  wave = sum(np.sin(2 * np.pi * k * f0 * t + rng.random() * 6) / k for k in range(1, 8))
  envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + rng.random()) * t)
  return (0.1 * wave * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def sessions_by_slot(server: Server, frames: dict[int, int], first_seed: int) -> dict:
  """Concurrent unpaced sessions, voice(first_seed + i, n) for each i, n in frames.items(), all at
  once against `server` -> {slot: Conversation}."""

  async def scenario():
    async with running(server) as addr:
      return await asyncio.gather(
        *[
          converse(f'ws://{addr}/api/chat', voice(first_seed + i, n), pace=False)
          for i, n in frames.items()
        ]
      )

  convs = asyncio.run(scenario())
  return {next(s.slot for s in server.finished if s.sid == c.session): c for c in convs}


def check_crosstalk(pipeline, cfg, convs: dict, frames: dict | None = None) -> dict:
  """{slot: Conversation} -> {slot: mismatch list} against an offline replay of what the server
  decoded; also confirms the check fails when two sessions' references are swapped."""
  ref = replay(pipeline, {slot: c.sent_pcm for slot, c in convs.items()})
  found = {
    slot: mismatches(c, cfg, *ref[slot], frames=(frames or {}).get(slot))
    for slot, c in convs.items()
  }
  slots = sorted(convs)
  if len(slots) > 1:  # the check can fail: another slot's reference never matches
    assert mismatches(convs[slots[0]], cfg, *ref[slots[1]]), 'swapped references matched'
  return found


class RawSocket:
  """A websocket client on a plain socket: small receive buffer, never reads unless asked,
  can send anything (client frames are masked with a zero key, as RFC 6455 requires)."""

  def __init__(self, addr: str, path: str = '/api/chat', rcvbuf: int = 4096):
    host, port = addr.split(':')
    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    self.sock.settimeout(10)
    self.sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    self.sock.sendall(
      (
        f'GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n'
        f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
        f'Sec-WebSocket-Version: 13\r\n\r\n'
      ).encode()
    )
    head = b''
    while b'\r\n\r\n' not in head:
      head += self.sock.recv(1)
    self.status = int(head.split(b' ')[1])

  def send(self, payload: bytes, opcode: int = 2) -> None:
    n = len(payload)
    size = (
      bytes([0x80 | n])
      if n < 126
      else (
        bytes([0x80 | 126]) + struct.pack('!H', n)
        if n < 65536
        else bytes([0x80 | 127]) + struct.pack('!Q', n)
      )
    )
    self.sock.sendall(bytes([0x80 | opcode]) + size + b'\0\0\0\0' + payload)

  def close(self) -> None:
    self.sock.close()


async def wait_for(predicate, timeout_s: float = 20.0, step_s: float = 0.05) -> bool:
  """Polls predicate() until true or timeout (bounded)."""
  for _ in range(int(timeout_s / step_s)):
    if predicate():
      return True
    await asyncio.sleep(step_s)
  return predicate()


@contextlib.contextmanager
def serving_in_thread(server: Server, timeout_s: float = 60.0):
  """Serves `server` from a thread with its own event loop (for blocking callers: a browser
  driver, the `flmjax client` CLI); yields 'host:port' and always shuts the server down."""
  import threading

  ready, addr, stop = threading.Event(), [], []

  def serve():
    loop = asyncio.new_event_loop()
    stop.append(loop.create_future())

    async def body():
      async with running(server) as a:
        addr.append(a)
        ready.set()
        await stop[0]

    loop.run_until_complete(body())
    loop.close()

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  if not ready.wait(timeout_s):
    raise TimeoutError(f'the server did not start within {timeout_s:g} s')
  try:
    yield addr[0]
  finally:
    stop[0].get_loop().call_soon_threadsafe(stop[0].set_result, None)
    thread.join(timeout_s)
