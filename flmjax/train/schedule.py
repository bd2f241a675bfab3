"""The dual schedule: its two stages (`dual_stages`), where a global step falls among the stages,
and each stage's lr (optax)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import StageConfig, TrainConfig

SINGLE_SPEAKER_LAYOUTS = ('lead', 'trail')  # TTS-style and ASR-style


def dual_stages(
  tts_asr: str,
  duplex: str,
  *,
  steps: tuple[int, int],
  peak_lr: tuple[float, float],
  warmup_steps: tuple[int, int],
  end_lr_ratio: tuple[float, float],
  lead_frames: int = 2,
  trail_frames: int = 0,
  layouts: tuple[str, ...] = SINGLE_SPEAKER_LAYOUTS,
  mix: float = 0.0,
) -> tuple[StageConfig, StageConfig]:
  """The paper's dual schedule (docs/architecture.md §7) as two stages; each tuple argument holds
  (stage 1, stage 2).

  'asr_tts': the single-speaker data at `tts_asr` in each of `layouts`: 'lead' (TTS-style: speech
  on speak, its text leading by lead_frames) and 'trail' (ASR-style: speech on listen, its text
  trailing by trail_frames). 'duplex': the conversations at `duplex`, the monologue leading by
  lead_frames, beside each single-speaker layout at weight `mix` (0: conversations only).
  """
  single = {
    'lead': SourceSpec(tts_asr, layout='lead', offset_frames=lead_frames, speech_stream='speak'),
    'trail': SourceSpec(
      tts_asr, layout='trail', offset_frames=trail_frames, speech_stream='listen'
    ),
  }
  conversations = SourceSpec(duplex, layout='lead', offset_frames=lead_frames)
  mixed = tuple(dataclasses.replace(single[k], weight=mix) for k in layouts) if mix else ()
  sources = (tuple(single[k] for k in layouts), (conversations,) + mixed)
  return tuple(
    StageConfig(
      name,
      steps=steps[i],
      sources=sources[i],
      loss_weights=LossWeights(),
      peak_lr=peak_lr[i],
      warmup_steps=warmup_steps[i],
      end_lr_ratio=end_lr_ratio[i],
    )
    for i, name in enumerate(('asr_tts', 'duplex'))
  )


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
