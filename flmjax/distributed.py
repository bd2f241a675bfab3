"""Joining a multi-process job (jax.distributed) before any device is touched: the settings
checked, what it waits for said, and the wait bounded.

jax's coordination client ends the whole process (SIGABRT, a C++ stack trace) when the job does
not form in time, so the bound is ours: a process other than 0 first waits for the coordinator's
port (a plain error when it never opens), and a watchdog ends a process whose jax.distributed.
initialize() outlives the bound with one line instead of the abort.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import jax

from flmjax.errors import FlmjaxError
from flmjax.platforms import tpu_chips_present

DEFAULT_TIMEOUT_S = 300.0  # --coordinator-timeout-s
PROGRESS_S = 30.0  # while waiting, one line this often: who is awaited, where, how long so far

# Environment variables of a multi-process job that jax.distributed.initialize() reads by itself
# (its cluster auto-detection: Kubernetes TPU, SLURM, Open MPI, an explicit coordinator).
_CLUSTER_MARKERS = (
  'JAX_COORDINATOR_ADDRESS',
  'TPU_WORKER_HOSTNAMES',
  'MEGASCALE_COORDINATOR_ADDRESS',
  'SLURM_JOB_NUM_NODES',
  'OMPI_COMM_WORLD_SIZE',
)


class DistributedError(FlmjaxError, ValueError):
  """The multi-process settings are wrong, or the job did not form in time."""


def _exit_with(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  os._exit(1)  # the main thread is blocked inside jax's C++ client: nothing else ends it


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  multihost: bool = False,
  timeout_s: float = DEFAULT_TIMEOUT_S,
  *,
  log: Callable[[str], None] = print,
  on_timeout: Callable[[str], None] = _exit_with,
  progress_s: float = PROGRESS_S,
  clock: Callable[[], float] = time.monotonic,
  sleep: Callable[[float], None] = time.sleep,
) -> bool:
  """Joins a multi-process job before any device is touched; returns whether one was joined.

  Unset arguments default to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID. With
  all three known (e.g. N local processes) they are passed explicitly; otherwise
  jax.distributed.initialize() runs with no arguments when the environment names a cluster or
  `multihost` is set (a Cloud TPU VM pod slice needs nothing else). A single process does nothing.
  The job must form within timeout_s: else DistributedError (no coordinator), or on_timeout(line)
  from a watchdog thread (the default prints it and exits with status 1). While it waits, a line
  every progress_s seconds (of `clock`) says for whom and how long so far.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ.get
  coordinator_address = coordinator_address or env('JAX_COORDINATOR_ADDRESS') or None
  num_processes = num_processes if num_processes is not None else _env_int('JAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _env_int('JAX_PROCESS_ID')
  if num_processes == 1:
    return False
  if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
    raise DistributedError(
      f'distributed: --coordinator-timeout-s {timeout_s} must be a number > 0 (seconds)'
    )
  started = clock()
  deadline = started + timeout_s
  if None not in (coordinator_address, num_processes, process_id):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(
        f'distributed: process_id {process_id} is outside 0..{num_processes - 1}'
      )
    host, port = parse_address(coordinator_address)
    who = f'process {process_id} of {num_processes}'
    log(
      f'distributed: {who}, coordinator {coordinator_address}: waiting up to {timeout_s:g} s '
      f'for '
      + ('the other processes' if process_id == 0 else 'the coordinator (process 0)')
      + ' (--coordinator-timeout-s)'
    )
    where = f'{who}, coordinator {coordinator_address}'
    if process_id != 0:
      waiting = Progress(
        f'distributed: {where}: waiting for the coordinator (process 0)',
        started,
        timeout_s,
        progress_s,
        log,
        clock,
      )
      _wait_for_port(host, port, deadline, where, timeout_s, waiting, clock, sleep)
    # CPU processes exchange collectives through gloo (the setting does nothing on TPU or GPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    awaited = (
      f'the other {num_processes - 1} process(es) to join'
      if process_id == 0
      else f'all {num_processes} processes to join'
    )
    waiting = Progress(
      f'distributed: {where}: waiting for {awaited}', started, timeout_s, progress_s, log, clock
    )
    _initialize(
      deadline,
      timeout_s,
      on_timeout,
      where,
      waiting,
      coordinator_address,
      num_processes,
      process_id,
    )
    return True
  if multihost or _in_cluster(env):
    if coordinator_address:
      parse_address(coordinator_address)
    elif not _in_cluster(env) and not tpu_chips_present():
      raise DistributedError(
        'distributed: --multihost discovers the job on a Cloud TPU VM, and this machine has '
        'no TPU chips; elsewhere give --coordinator-address HOST:PORT, --num-processes N and '
        '--process-id I (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)'
      )
    log(
      f'distributed: discovering the job ({"--multihost" if multihost else "cluster env"}); '
      f'waiting up to {timeout_s:g} s (--coordinator-timeout-s)'
    )
    waiting = Progress(
      'distributed: waiting for the discovered job to form',
      started,
      timeout_s,
      progress_s,
      log,
      clock,
    )
    _initialize(
      deadline,
      timeout_s,
      on_timeout,
      'the discovered job',
      waiting,
      coordinator_address,
      num_processes,
      process_id,
    )
    return True
  if num_processes is not None or process_id is not None:
    raise DistributedError(
      'distributed: num_processes / process_id given without a coordinator '
      'address (--coordinator-address or $JAX_COORDINATOR_ADDRESS)'
    )
  return False


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' (or '[v6]:port') -> (host, port); DistributedError naming the address."""
  host, colon, port = str(address).rpartition(':')
  host = host[1:-1] if host.startswith('[') and host.endswith(']') else host
  if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
      f'distributed: coordinator address {address!r} must be HOST:PORT '
      '(e.g. 10.0.0.2:1234), the address of process 0'
    )
  return host, int(port)


class Progress:
  """`what: N s so far (up to T s)`, logged once per `every_s` of `clock` since `started`, when
  `tick` finds another period gone by (a loop calls it, or `report_until` from a thread)."""

  def __init__(self, what, started, timeout_s, every_s, log, clock=time.monotonic):
    self.what, self.started, self.timeout_s = what, started, timeout_s
    self.every_s, self.log, self.clock = every_s, log, clock
    self.next = every_s

  def tick(self) -> None:
    waited = self.clock() - self.started
    if waited >= self.next:
      self.log(f'{self.what}: {int(waited)} s so far (up to {self.timeout_s:g} s)')
      self.next = (waited // self.every_s + 1) * self.every_s

  def report_until(self, stop: threading.Event) -> None:
    """Ticks at each period's end until `stop` is set (a thread's body while jax blocks)."""
    while not stop.wait(max(self.started + self.next - self.clock(), 0.0) + 0.05):
      self.tick()


def _wait_for_port(
  host: str,
  port: int,
  deadline: float,
  who: str,
  timeout_s: float,
  waiting: Progress,
  clock=time.monotonic,
  sleep=time.sleep,
) -> None:
  """Until the coordinator accepts TCP connections, or the deadline."""
  while True:
    waiting.tick()
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - clock()))):
        return
    except socket.gaierror as e:
      raise DistributedError(
        f'distributed: {who}: cannot resolve host {host!r} ({e.strerror})'
      ) from None
    except OSError:
      if clock() >= deadline:
        raise DistributedError(
          f'distributed: {who}: no coordinator answered within {timeout_s:g} s; start process 0 '
          'with the same address, check the host, port and firewall, or raise '
          '--coordinator-timeout-s'
        ) from None
      sleep(min(0.5, max(0.0, deadline - clock())))


def _initialize(
  deadline: float, timeout_s: float, on_timeout, who: str, waiting: Progress, *args
) -> None:
  left = max(deadline - waiting.clock(), 0.1)
  watchdog = threading.Timer(
    left,
    on_timeout,
    [
      f'distributed: {who}: the job did not form within {timeout_s:g} s (not every process '
      'joined); start all of them with the same settings, or raise --coordinator-timeout-s'
    ],
  )
  watchdog.daemon = True
  watchdog.start()
  joined = threading.Event()
  threading.Thread(target=waiting.report_until, args=(joined,), daemon=True).start()
  try:  # jax's own bound comes later: the watchdog speaks first
    jax.distributed.initialize(*args, initialization_timeout=int(left) + 30)
  except (IndexError, ValueError, RuntimeError) as e:
    raise DistributedError(f'distributed: {who}: {type(e).__name__}: {e}') from None
  finally:
    joined.set()
    watchdog.cancel()


def _in_cluster(env) -> bool:
  """Whether the environment names a multi-host job. One TPU worker host (a single-host VM, or
  `flmjax aot`'s compile-only settings) is not a cluster."""
  hosts = [h for h in (env('TPU_WORKER_HOSTNAMES') or '').split(',') if h.strip()]
  return len(hosts) > 1 or any(env(m) for m in _CLUSTER_MARKERS if m != 'TPU_WORKER_HOSTNAMES')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f'distributed: ${name}={value!r} is not an integer') from None
