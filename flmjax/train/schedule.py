"""The dual schedule: where a global step falls among the stages, and each stage's lr."""
from __future__ import annotations

import math
from typing import NamedTuple

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


def learning_rate(stage: StageConfig, step_in_stage: int) -> float:
  """Linear warmup to peak_lr, then cosine down to peak_lr * end_lr_ratio at the stage's end."""
  peak, end = stage.peak_lr, stage.peak_lr * stage.end_lr_ratio
  if step_in_stage < stage.warmup_steps:
    return peak * (step_in_stage + 1) / stage.warmup_steps
  span = max(1, stage.steps - stage.warmup_steps)
  progress = min(1.0, (step_in_stage - stage.warmup_steps) / span)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
