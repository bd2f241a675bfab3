"""The listening socket, bound before the model loads: a busy or forbidden port is reported at
once, not after a minute of loading and compiling. Imports nothing heavy."""

from __future__ import annotations

import errno
import socket

BACKLOG = 128  # aiohttp's default


def bind_socket(host: str, port: int, flag: str = '`port`') -> socket.socket:
  """A listening TCP socket on host:port (port 0: any free port); OSError naming `host` and
  `flag` (the port's argument; a command spells them as its flags)."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise OSError(f'`host` {host}: cannot resolve it ({e.strerror})') from None
  family, kind, proto, _, address = infos[0]
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses TIME_WAIT ports
  try:
    sock.bind(address)
    sock.listen(BACKLOG)
  except OSError as e:
    sock.close()
    why = {
      errno.EADDRINUSE: f'the port is in use (another server?); pass another {flag}',
      errno.EACCES: f'permission denied (ports below 1024 need privileges); pass another {flag}',
      errno.EADDRNOTAVAIL: 'no such address on this machine; pass another `host`',
    }
    raise OSError(
      f'`host` {host} {flag} {port}: cannot listen: {why.get(e.errno, e.strerror)}'
    ) from None
  return sock
