"""Orbax checkpoints of a run: params, optimizer state and a JSON `meta` item (stage, step in
stage, data iterator state, configs). Async; orbax's tmp-dir protocol means a checkpoint is
only visible once complete, so a run killed at any moment resumes from the last whole one."""
from __future__ import annotations

import base64
import json
import os
import pickle
from typing import Any

import jax
import orbax.checkpoint as ocp

from flmjax.train.state import TrainState

ITEMS = ('params', 'opt_state', 'meta')


class CheckpointMissingError(FileNotFoundError):
  """No complete checkpoint in a directory."""


def encode_data_state(state: Any) -> dict:
  """A data-iterator state as JSON: as is when it is JSON, else pickled and base64-encoded."""
  try:
    json.dumps(state)
    return {'json': state}
  except TypeError:
    return {'pickle': base64.b64encode(pickle.dumps(state)).decode('ascii')}


def decode_data_state(blob: dict) -> Any:
  if 'json' in blob:
    return blob['json']
  return pickle.loads(base64.b64decode(blob['pickle']))


class Checkpointer:
  """Keeps the last `keep` checkpoints of `directory`, one every `every` steps."""

  def __init__(self, directory: str, *, every: int = 1, keep: int = 3, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, meta: dict, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it started."""
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                              opt_state=ocp.args.StandardSave(state.opt_state),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise CheckpointMissingError(f'{self.directory}: no complete checkpoint'
                                   + ('' if step is None else f' at step {step}'))
    return step

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores onto `abstract`'s shardings (any mesh shape) -> (state, meta)."""
    step = self._step(step)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        meta=ocp.args.JsonRestore()))
    return TrainState(out['params'], out['opt_state']), out['meta']

  def restore_params(self, abstract_params, step: int | None = None):
    step = self._step(step)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return out['params']

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_on_cpu(tree):
  """ShapeDtypeStructs for `tree` placed on one CPU device (for export and inspection)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)
