"""Run directories, local or in a bucket (gs://): created up front, with one-line errors that
name the path and the reason, and a bounded wait for a bucket that does not answer."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable

from etils import epath

# URL scheme -> the fsspec package epath needs for it, and the extra that installs it.
FILESYSTEMS = {'gs': ('gcsfs', 'flmjax[gcs]'), 's3': ('s3fs', None)}
REMOTE_TIMEOUT_S = 60.0  # a bucket that does not answer in this long is unreachable


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path; local paths made absolute (orbax needs that), URLs such as gs:// kept."""
  text = os.fspath(path)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def is_remote(path: str | os.PathLike) -> bool:
  return '://' in os.fspath(path)


def _exists(path: str) -> bool:
  """What check_remote asks of a bucket (tests stand in for it: no bucket is reachable here)."""
  return epath.Path(path).exists()


# What the storage clients log while they retry (gcsfs logs each failed request with its
# traceback, google.auth its credential lookup); check_remote's one line carries the cause.
CLIENT_LOGGERS = ('fsspec', 'google', 'botocore', 'aiobotocore')


class _QuietLoggers:
  """Holds back the records of `names` (and their children) from stderr while it is on; the
  records are kept in `records` (for tests and a debugger)."""

  def __init__(self, names):
    self.records: list[logging.LogRecord] = []
    self._saved = []
    for name in names:
      logger = logging.getLogger(name)
      handler = _Keep(self.records)
      self._saved.append((logger, handler, logger.propagate, list(logger.handlers)))
      logger.handlers = [handler]  # also keeps logging's last-resort stderr handler away
      logger.propagate = False

  def restore(self) -> None:
    for logger, _, propagate, handlers in self._saved:
      logger.handlers, logger.propagate = handlers, propagate
    self._saved = []


class _Keep(logging.Handler):
  def __init__(self, records: list):
    super().__init__()
    self.records = records

  def emit(self, record):
    self.records.append(record)


def check_remote(
  path: str | os.PathLike,
  *,
  timeout_s: float | None = None,
  probe: Callable[[str], object] | None = None,
) -> None:
  """For a URL run directory: its filesystem package is installed, and the bucket answers
  (credentials, network) within timeout_s (default REMOTE_TIMEOUT_S). OSError with one line
  otherwise. probe(path) is what is asked of the bucket (default: whether the path exists)."""
  timeout_s = REMOTE_TIMEOUT_S if timeout_s is None else timeout_s
  text = os.fspath(path)
  if not is_remote(text):
    return
  scheme = text.split('://', 1)[0]
  package, extra = FILESYSTEMS.get(scheme, (None, None))
  if package is not None:
    try:
      __import__(package)
    except ImportError:
      how = (
        f'pip install "{extra}" (or pip install {package})' if extra else f'pip install {package}'
      )
      raise OSError(
        f'{text}: {scheme}:// paths need the {package} package, which is not installed: {how}'
      ) from None
  probe = probe or _exists
  outcome: list = []

  def ask():
    try:
      outcome.append(('ok', probe(text)))
    except BaseException as e:  # anything the client raises becomes the message
      outcome.append(('error', e))

  quiet = _QuietLoggers((package or scheme, *CLIENT_LOGGERS))
  worker = threading.Thread(target=ask, daemon=True)  # a hung client never blocks the exit
  worker.start()
  worker.join(timeout_s)
  quiet.restore()
  if not outcome:
    raise OSError(
      f'{text}: no answer from {scheme}:// within {timeout_s:g} s; check the network '
      'and the credentials (e.g. gcloud auth application-default login)'
    )
  kind, value = outcome[0]
  if kind == 'error':
    first = (str(value).strip().splitlines() or [''])[0][:200]
    raise OSError(
      f'{text}: cannot reach it: {type(value).__name__}: {first} (check the '
      'credentials and the network)'
    )


def make_run_dir(path: str | os.PathLike, *, timeout_s: float | None = None) -> epath.Path:
  """Creates the run directory (and its parents) and checks that it takes files; OSError naming
  the path and why (a regular file in the way, permission denied, a read-only file system)."""
  check_remote(path, timeout_s=timeout_s)
  run_dir = as_path(path)
  if not is_remote(path):
    _no_file_in_the_way(os.fspath(run_dir))
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_remote(path):  # a read-only mount or folder fails here, not at the first save
      tempfile.TemporaryFile(dir=os.fspath(run_dir)).close()
  except OSError as e:
    raise OSError(
      f'run directory {path} cannot be created or written: '
      f'{e.strerror or e}; pass another `run_dir`'
    ) from None
  return run_dir


def _no_file_in_the_way(path: str) -> None:
  """The run directory, or its nearest existing ancestor, must be a directory."""
  target = path
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise OSError(
      f'run directory {target} is a file; pass another `run_dir`'
      if path == target
      else f'run directory {target} cannot be created: {path} is a file, not a '
      'directory; pass another `run_dir`'
    )


def check_run_dir(path: str | os.PathLike, *, timeout_s: float | None = None) -> None:
  """What make_run_dir would refuse, found without creating anything: a bucket that cannot be
  used, or a regular file in the way."""
  check_remote(path, timeout_s=timeout_s)
  if not is_remote(path):
    _no_file_in_the_way(os.fspath(as_path(path)))
