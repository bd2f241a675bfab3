"""The dual schedule: where a global step falls among the stages, and each stage's lr (optax)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flmjax.train.config import StageConfig, TrainConfig


class Position(NamedTuple):
  stage: int  # index into TrainConfig.stages (== len(stages) when the run is done)
  step_in_stage: int  # steps of this stage already taken


def position(tc: TrainConfig, global_step: int) -> Position:
  """Global step (steps taken so far) -> (stage, steps taken inside it)."""
  if global_step < 0 or global_step > tc.total_steps:
    raise ValueError(f'global step {global_step} is outside the schedule [0, {tc.total_steps}]')
  start = 0
  for i, s in enumerate(tc.stages):
    if global_step < start + s.steps:
      return Position(i, global_step - start)
    start += s.steps
  return Position(len(tc.stages), 0)


def stage_start(tc: TrainConfig, stage: int) -> int:
  return sum(s.steps for s in tc.stages[:stage])


def stage_schedule(stage: StageConfig) -> optax.Schedule:
  """Step in stage -> lr: linear warmup that reaches peak_lr at step warmup_steps - 1 (so step 0
  already trains), then cosine from peak_lr to peak_lr * end_lr_ratio at the stage's end."""
  return _schedule(stage.peak_lr, stage.warmup_steps, stage.steps, stage.end_lr_ratio)


def _schedule(peak: float, warmup: int, steps: int, end_ratio: float) -> optax.Schedule:
  cosine = optax.cosine_decay_schedule(peak, decay_steps=max(1, steps - warmup), alpha=end_ratio)
  if not warmup:
    return cosine
  ramp = optax.linear_schedule(peak / warmup, peak, transition_steps=warmup - 1)
  return optax.join_schedules([ramp, cosine], boundaries=[warmup])


@functools.lru_cache(maxsize=64)
def _table(peak: float, warmup: int, steps: int, end_ratio: float) -> np.ndarray:
  # Evaluated once per stage on the host's CPU: reading a per-step lr back from an accelerator
  # would wait for the steps queued before it.
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    table = np.asarray(_schedule(peak, warmup, steps, end_ratio)(jnp.arange(steps)), np.float32)
  table.setflags(write=False)
  return table


def learning_rates(stage: StageConfig) -> np.ndarray:
  """float32 [stage.steps]: the lr of every step of the stage."""
  return _table(stage.peak_lr, stage.warmup_steps, stage.steps, stage.end_lr_ratio)


def learning_rate(stage: StageConfig, step_in_stage: int) -> float:
  return float(learning_rates(stage)[step_in_stage])
