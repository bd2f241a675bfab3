"""Per-stage batch iterators (per host) and their assembly into globally sharded arrays."""

from __future__ import annotations

import grain
import jax
import numpy as np

from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.train.config import StageConfig, TrainConfig, TrainConfigError


def _loss_weights(stage: StageConfig):
  from flmjax.data.grid import LossWeights

  return stage.loss_weights if stage.loss_weights is not None else LossWeights()


class RandomGridIterator(grain.DatasetIterator):
  """Random samples laid out by flmjax.data.grid.build_grid (tests and benchmarks).

  Sample n of this shard is drawn from a generator seeded with (seed, shard, n), so the state is
  just the next sample index and restoring it resumes exactly. A grain iterator, so that grain's
  checkpoint handler saves and restores it like the record pipeline's.
  """

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    window: int,
    batch_size: int,
    seed: int,
    loss_weights,
    shard_index: int = 0,
  ):
    super().__init__()
    self.cfg, self.window, self.batch_size = cfg, window, batch_size
    self.seed, self.shard, self.loss_weights = seed, shard_index, loss_weights
    self.next_index = 0

  def _sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    from flmjax.data.grid import build_grid

    cfg = self.cfg
    rng = np.random.default_rng((self.seed, self.shard, n))
    frames = self.window - max(cfg.grid_offsets)
    text = rng.integers(0, min(cfg.vocab_size, cfg.text_bos_id), frames)
    text = np.where(rng.random(frames) < 0.5, cfg.text_wait_id, text)
    speak = rng.integers(0, cfg.audio_pad_id, (cfg.num_codebooks, frames))
    listen = rng.integers(0, cfg.audio_pad_id, (cfg.num_codebooks, frames))
    return build_grid(cfg, text, speak, listen, self.loss_weights, num_columns=self.window)

  def __next__(self) -> dict[str, np.ndarray]:
    samples = [self._sample(self.next_index + i) for i in range(self.batch_size)]
    self.next_index += self.batch_size
    return {
      'tokens': np.stack([s[0] for s in samples]),
      'weights': np.stack([s[1] for s in samples]),
    }

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index = int(state['next_index'])


def stage_seed(tc: TrainConfig, stage_index: int) -> int:
  return tc.seed * 1009 + stage_index


def make_stage_loader(
  tc: TrainConfig,
  stage_index: int,
  *,
  seed: int | None = None,
  sources=None,
  shard_index: int | None = None,
  shard_count: int | None = None,
):
  """This host's iterator over stage `stage_index`'s data (its share of the global batch): a grain
  DatasetIterator, which the checkpointer saves with grain's handler."""
  stage = tc.stages[stage_index]
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  batch_size, window = tc.stage_batch_size(stage_index), tc.stage_window(stage_index)
  if batch_size % shard_count:
    raise TrainConfigError(f'batch_size {batch_size} is not a multiple of the {shard_count} hosts')
  local = batch_size // shard_count
  seed = stage_seed(tc, stage_index) if seed is None else seed
  if stage.random_data and sources is None:
    return RandomGridIterator(
      tc.model,
      window=window,
      batch_size=local,
      seed=seed,
      loss_weights=_loss_weights(stage),
      shard_index=shard_index,
    )
  from flmjax.data.pipeline import make_loader

  return make_loader(
    tc.model,
    tuple(sources if sources is not None else stage.sources),
    window=window,
    batch_size=local,
    seed=seed,
    loss_weights=_loss_weights(stage),
    shard_index=shard_index,
    shard_count=shard_count,
  )


def check_sources(tc: TrainConfig) -> None:
  """Every stage's sources (and the eval's) are prepared datasets with records. Checked before step
  0, so that a missing stage-2 source cannot fail the run after stage 1 has trained."""
  from flmjax.data.pipeline import SourceSpec
  from flmjax.data.records import record_files

  named = [(f'stage {s.name!r}', s.sources) for s in tc.stages if not s.random_data]
  for where, sources in named + [('eval_sources', tc.eval_sources)]:
    for i, spec in enumerate(sources):
      if not isinstance(spec, SourceSpec):
        raise TrainConfigError(
          f'{where}: source {i} is a {type(spec).__name__}; give a '
          'flmjax.data.pipeline.SourceSpec(path, ...)'
        )
      try:
        record_files(spec.path)
      except (OSError, ValueError) as e:
        raise TrainConfigError(f'{where}: source {i}: {e}') from None


def check_batch(tc: TrainConfig, batch: dict, where: str, stage: int = 0) -> None:
  """Fails early, naming the problem, when a loader yields the wrong shapes for `stage`."""
  local = tc.stage_batch_size(stage) // jax.process_count()
  want = (local, tc.model.num_channels, tc.stage_window(stage))
  for key in ('tokens', 'weights'):
    if key not in batch:
      raise TrainConfigError(f'{where}: batch has no {key!r} (keys: {sorted(batch)})')
    if tuple(batch[key].shape) != want:
      raise TrainConfigError(
        f'{where}: batch[{key!r}] has shape {tuple(batch[key].shape)}, '
        f'expected {want} (local batch, channels, window)'
      )


def data_counts(batch: dict, *, all_hosts: bool = True) -> dict[str, float]:
  """The monologue counts of a batch (pushed frames, cut tokens, extension frames; see
  flmjax.data.pipeline.COUNTS), summed over every host's rows (or this host's: `all_hosts=False`,
  then `sum_over_hosts`). Empty for loaders without them."""
  from flmjax.data.pipeline import COUNTS

  local = {k: float(np.sum(batch[k])) for k in COUNTS if k in batch}
  return sum_over_hosts([local])[0] if all_hosts else local


def sum_over_hosts(counts: list[dict[str, float]]) -> list[dict[str, float]]:
  """Per-step counts of this host -> summed over every host, in one collective for all steps."""
  if jax.process_count() == 1 or not counts or not counts[0]:
    return counts
  from jax.experimental import multihost_utils

  keys = list(counts[0])
  local = np.array([[c[k] for k in keys] for c in counts], np.int64)  # [steps, keys]
  total = np.asarray(multihost_utils.process_allgather(local)).sum(0)
  return [{k: float(v) for k, v in zip(keys, row)} for row in total]


to_global = shd.to_global  # this host's rows -> global arrays
