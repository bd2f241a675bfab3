"""Orbax checkpoints of a run, on any epath (local or gs://):
- params and optimizer state, written by every process (each its own shards);
- a JSON `meta` item written by process 0: global step, stage, step in stage, process count and
  the configs;
- a `data` item, mid-stage: each process's data-iterator state in its own file, written and read by
  grain's own orbax handler (grain.checkpoint).

Saves are async. Orbax's tmp-dir protocol means a checkpoint is only visible once complete, so a
run killed at any moment resumes from the last whole one. A step that is complete but cannot be
read (a truncated file, bad metadata) is moved aside to `<dir>_corrupt/`, never deleted, and the
step before it is used.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from flmjax.checkpoint.safetensors_io import CorruptCheckpointError
from flmjax.checkpoint.storage import as_path
from flmjax.errors import FlmjaxError

ITEMS = ('params', 'opt_state', 'meta', 'data')


class TrainState(Protocol):
  """What a checkpoint holds of a train state (flmjax.train.state.TrainState): a NamedTuple of
  params and optimizer state; restore gives back the abstract state's own type."""

  params: Any
  opt_state: Any


class CheckpointMissingError(FlmjaxError, FileNotFoundError):
  """No complete checkpoint in a directory."""


class ProcessCountError(FlmjaxError, ValueError):
  """A mid-stage checkpoint resumed by another number of processes than wrote it."""


def _earlier_data_state(folder) -> tuple[bool, Any]:
  """(True, state) when step folder `folder` holds no state of grain's handler: no data item
  (state None: the stage's data starts over), or the {'state': {'json': state} | None} flmjax
  wrote before it used grain's handler; else (False, None)."""
  if not (folder / 'data').exists():
    return True, None
  try:
    saved = json.loads((folder / 'data' / _process_file()).read_text())
  except (OSError, ValueError):
    return False, None  # grain's handler names the problem
  old = saved.get('state', ()) if isinstance(saved, dict) and len(saved) == 1 else ()
  if old is None or (isinstance(old, dict) and old.keys() == {'json'}):
    return True, old and old['json']
  if isinstance(old, dict) and old.keys() == {'pickle'}:
    raise CorruptCheckpointError(f'{folder}/data: a pickled data state, which flmjax never reads')
  return False, None


def _process_file() -> str:
  """This process's file of a step's `data` item (grain's naming)."""
  return f'process_{jax.process_index()}-of-{jax.process_count()}.json'


def one_line(e: BaseException) -> str:
  """`Type: first line` of an error; orbax's read errors lose their TensorStore spec dump."""
  text = str(e).strip().splitlines()
  first = text[0].split(' See full TensorStore details')[0] if text else ''
  return f'{type(e).__name__}: {first[:300]}'


def drop_abandoned_reads() -> None:
  """Call once a damaged step failed to restore. The reads orbax ran beside the failed one are
  abandoned: each is collected unawaited and printed ("Exception ignored in: <coroutine ...>"
  with its whole TensorStore spec, tens of lines), their gathering future logs its exception as
  never retrieved (asyncio's logger), and their completion callbacks find orbax's event loop
  closed (a traceback each). flmjax names the step in one line. Collects the abandoned reads
  now, while the step's failure is being handled; the echoes are dropped by the hooks
  `_quiet_abandoned_reads` installed before the read began."""
  _quiet_abandoned_reads()
  gc.collect()


def _quiet_abandoned_reads() -> None:
  """From here on this process drops the echoes of abandoned reads, and only them: any other
  unraisable exception, uncaught error or asyncio record still prints. Installed before every
  array read, not after a failed one: a TensorStore thread can complete a sibling read (and
  print its closed-loop traceback) between orbax raising and flmjax catching the error."""
  asyncio_log = logging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedReads) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReads())
  if getattr(sys.unraisablehook, 'flmjax_drops_reads', False):
    return
  unraisable, excepthook, thread_hook = sys.unraisablehook, sys.excepthook, threading.excepthook

  def quiet_unraisable(u):
    code = getattr(u.object, 'cr_code', None)  # a coroutine of orbax's
    ours = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
    if not (ours or _loop_closed(u.exc_value)):
      unraisable(u)

  def quiet_excepthook(kind, value, tb):  # TensorStore's callbacks print through PyErr_Print
    if not _loop_closed(value):
      excepthook(kind, value, tb)

  def quiet_thread_hook(args):  # a completion callback on one of TensorStore's threads
    if not _loop_closed(args.exc_value):
      thread_hook(args)

  quiet_unraisable.flmjax_drops_reads = True
  sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
  threading.excepthook = quiet_thread_hook


def _loop_closed(e: BaseException | None) -> bool:
  """The echo of a read completing after orbax closed its event loop, and nothing else."""
  return type(e) is RuntimeError and str(e) == 'Event loop is closed'


class _AbandonedReads(logging.Filter):
  """Drops asyncio's 'exception was never retrieved' for orbax's failed TensorStore reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ('never retrieved' in text and 'TensorStore' in text)


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one process's unreadable file fails them all)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Keeps the last `keep` checkpoints of `directory`, one every `every` steps."""

  def __init__(
    self, directory: str | os.PathLike, *, every: int = 1, keep: int = 3, use_async: bool = True
  ):
    self.directory = as_path(directory)
    self.aside = self.directory.parent / f'{self.directory.name}_corrupt'
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=every, max_to_keep=keep, create=True, enable_async_checkpointing=use_async
    )
    handlers = {
      'params': ocp.StandardCheckpointHandler(),
      'opt_state': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: TrainState,
    meta: dict,
    data: grain.DatasetIterator | None = None,
    force: bool = False,
  ) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it started.

    `data`: this process's data iterator, whose state the step keeps (read before this returns),
    or None at a stage's end.
    """
    meta = {**meta, 'process_count': jax.process_count()}
    items: dict[str, ocp.args.CheckpointArgs] = dict(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave(meta),
    )
    if data is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise CheckpointMissingError(
        f'{self.directory}: no complete checkpoint' + ('' if step is None else f' at step {step}')
      )
    return step

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    path = self.directory / str(step) / 'meta' / 'metadata'
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return meta['meta']
    except (json.JSONDecodeError, FileNotFoundError, UnicodeDecodeError) as e:
      raise CorruptCheckpointError(
        f'{path}: the meta JSON of step {step} is truncated or unreadable ({one_line(e)})'
      ) from e

  def restore(
    self,
    abstract: TrainState,
    step: int | None = None,
    *,
    data: grain.DatasetIterator | None = None,
  ) -> tuple[TrainState, dict, grain.DatasetIterator | None]:
    """Restores onto `abstract`'s shardings (any mesh shape) -> (state, meta, data).

    `data`, a mid-stage resume's new iterator over the step's stage, gets this process's data
    state; that needs the process count that wrote it.
    """
    step = self._step(step)
    meta = self.restore_meta(step)
    wrote = int(meta.get('process_count', 1))
    if data is not None and wrote != jax.process_count():
      raise ProcessCountError(
        f'{self.directory}: step {step} was written by {wrote} processes and this run has '
        f'{jax.process_count()}: mid-stage, each process resumes its own shard of the data, so '
        f'resume with {wrote} processes (or export the checkpoint and start a new `run_dir` '
        f'with `init_from`)'
      )
    items: dict[str, ocp.args.CheckpointArgs] = dict(
      params=ocp.args.StandardRestore(abstract.params),
      opt_state=ocp.args.StandardRestore(abstract.opt_state),
    )
    earlier, data_state = (
      _earlier_data_state(self.directory / str(step)) if data is not None else (True, None)
    )
    if not earlier:
      items['data'] = grain.checkpoint.CheckpointRestore(data)
    _quiet_abandoned_reads()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data is not None and data_state is not None:
      data.set_state(data_state)
    return type(abstract)(out['params'], out['opt_state']), meta, data

  def restore_latest(
    self,
    abstract: TrainState | Callable[[dict], TrainState],
    *,
    check: Callable[[dict], grain.DatasetIterator | None],
    log=print,
  ) -> tuple[TrainState, dict, grain.DatasetIterator | None] | None:
    """The newest step that restores, or None when there is none.

    `abstract` may be a function of the step's meta (the layout it was saved in).
    `check(meta)` raises on a config mismatch (which is no corruption) and returns the new data
    iterator to set to the step's data state, or None when none is wanted. A step that fails to
    restore is named in one log line, moved aside and the step before it tried.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        meta, problem = self.restore_meta(step), None
      except CorruptCheckpointError as e:
        meta, problem = None, e
      if _all_agree(problem is None):
        data = check(meta)
        try:
          target = abstract(meta) if callable(abstract) else abstract
          restored = self.restore(target, step, data=data)
        except ProcessCountError:
          raise
        except Exception as e:  # anything unreadable: the step is bad, the run is not
          restored, problem = None, e
          drop_abandoned_reads()
        if _all_agree(problem is None):  # one process's failure makes all fall back together
          return restored
      self._set_aside(step, problem, log)
    if steps:
      raise CorruptCheckpointError(
        f'{self.directory}: none of the steps {steps} restores; they were moved to {self.aside}'
      )
    return None

  def _set_aside(self, step: int, problem: BaseException | None, log) -> None:
    """Moves step `step` to `<dir>_corrupt/<step>` (process 0) and rescans the steps."""
    target, n = self.aside / str(step), 0
    while target.exists():  # an earlier bad step of the same number stays too
      n += 1
      target = self.aside / f'{step}.{n}'
    reason = one_line(problem) if problem is not None else 'another process could not read it'
    log(
      f'checkpoint step {step} does not restore ({reason}); moved it to {target} and fell '
      f'back to the step before it'
    )
    if jax.process_index() == 0:
      self.aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'flmjax_set_aside_{step}')
    self.manager.reload()

  def restore_params(self, abstract_params, step: int | None = None):
    step = self._step(step)
    _quiet_abandoned_reads()
    out = self.manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    return out['params']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_on_cpu(tree):
  """ShapeDtypeStructs for `tree` placed on one CPU device (for export and inspection)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)
