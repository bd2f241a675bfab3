"""Preemption: a SIGTERM (the notice Cloud TPU and most schedulers send) makes the loop save a
checkpoint at a step every process agrees on, then stop."""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatch:
  """`reached(step)` turns True at the step where the run should save and stop.

  Several processes use JAX's preemption sync service (started by jax.distributed.initialize,
  which catches SIGTERM itself): every process reaches the same sync step. A single process
  catches SIGTERM here, while the watch is entered.
  """

  def __init__(self):
    self.requested = False
    self._distributed = False
    self._previous = None

  def __enter__(self) -> PreemptionWatch:
    self._distributed = jax.process_count() > 1
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._distributed:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
