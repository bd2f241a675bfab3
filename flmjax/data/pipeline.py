"""grain input pipeline: prepared ArrayRecord shards -> layout -> grids -> random windows ->
batches.

Per source: records (this host's shard) -> shuffle (reshuffled each epoch) -> repeat forever ->
random_map(decode, stage layout, build_grid, random window). Sources are mixed by weight, then
batched. Everything is a grain MapDataset indexed from 0, so the iterator state is one index and
restoring it resumes exactly; every random choice comes from grain's per-index seeded RNG.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flmjax.config import ModelConfig
from flmjax.data import records as rec_lib
from flmjax.data.grid import LossWeights, build_grid, pad_grid
from flmjax.data.monologue import layout_monologue

LAYOUTS = ('lead', 'trail', 'mixed')
SPEECH_STREAMS = ('speak', 'listen')


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One prepared dataset in a stage's mixture.

  layout and speech_stream apply to tts_asr samples; duplex samples always put the model on speak,
  the user on listen, and lead the model's speech with its monologue (by offset_frames).
  """
  path: str  # a folder written by `flmjax data prepare`
  weight: float = 1.0  # mixture weight
  layout: str = 'lead'  # 'lead' | 'trail' | 'mixed' (lead or trail with probability 1/2)
  offset_frames: int = 0  # lead_frames or trail_frames
  speech_stream: str = 'speak'  # tts_asr speech on 'speak' or 'listen'

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f'SourceSpec({self.path!r}): layout {self.layout!r} is not one of {LAYOUTS}')
    if self.speech_stream not in SPEECH_STREAMS:
      raise ValueError(f'SourceSpec({self.path!r}): speech_stream {self.speech_stream!r} is not '
                       f'one of {SPEECH_STREAMS}')
    if self.offset_frames < 0:
      raise ValueError(f'SourceSpec({self.path!r}): offset_frames {self.offset_frames} is negative')
    if not self.weight > 0:
      raise ValueError(f'SourceSpec({self.path!r}): weight {self.weight} must be positive')


def record_grid(cfg: ModelConfig, record: rec_lib.Record, spec: SourceSpec, mode: str,
                loss_weights: LossWeights) -> tuple[np.ndarray, np.ndarray]:
  """A whole sample's grid under the stage layout: tokens int32 [17, T], weights float32 [17, T]."""
  if record.kind == 'duplex':
    mode = 'lead'
    speak, listen = record.codes['model'], record.codes['user']
  else:
    (speech,) = record.codes.values()
    speak, listen = (speech, None) if spec.speech_stream == 'speak' else (None, speech)
  text, _, _ = layout_monologue(rec_lib.monologue_sentences(record), record.num_frames, mode,
                                spec.offset_frames, cfg.text_wait_id)
  return build_grid(cfg, text, speak, listen, loss_weights)


class _WindowedGrid:
  """grain random_map: serialized record -> one random window of its grid."""

  def __init__(self, cfg, spec, window, loss_weights):
    self.cfg, self.spec, self.window, self.loss_weights = cfg, spec, window, loss_weights

  def __call__(self, data: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = rec_lib.decode_record(data)
    mode = self.spec.layout
    if mode == 'mixed':
      mode = 'lead' if rng.random() < 0.5 else 'trail'
    tokens, weights = record_grid(self.cfg, record, self.spec, mode, self.loss_weights)
    start = int(rng.integers(0, tokens.shape[1] - self.window + 1)) if (
        tokens.shape[1] > self.window) else 0
    tokens, weights = pad_grid(self.cfg, tokens, weights, start, self.window)
    return {'tokens': tokens, 'weights': weights}


def _seed(seed: int, source: int, salt: int) -> int:
  return int(np.random.SeedSequence([seed, source, salt]).generate_state(1)[0])


def make_dataset(cfg: ModelConfig, sources: Sequence[SourceSpec], *, window: int, batch_size: int,
                 seed: int, loss_weights: LossWeights = LossWeights(),
                 shard_index: int | None = None, shard_count: int | None = None):
  """The batched grain MapDataset behind `make_loader` (infinite)."""
  import grain
  if not sources:
    raise ValueError('make_loader: no sources given')
  if window < 2 or batch_size < 1:
    raise ValueError(f'make_loader: need window >= 2 and batch_size >= 1 '
                     f'(got {window}, {batch_size})')
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'make_loader: shard_index {shard_index} is outside 0..{shard_count - 1}')
  parts = []
  for i, spec in enumerate(sources):
    files = rec_lib.record_files(spec.path)
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
    ds = ds[shard_index::shard_count]  # each host reads its own records
    if len(ds) == 0:
      raise ValueError(f'make_loader: {spec.path!r} has no records for shard {shard_index} of '
                       f'{shard_count}')
    ds = ds.shuffle(seed=_seed(seed, i, 0)).repeat(None)  # a new order every epoch
    ds = ds.random_map(_WindowedGrid(cfg, spec, window, loss_weights), seed=_seed(seed, i, 1))
    parts.append(ds)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in sources])
  return ds.batch(batch_size, drop_remainder=True)


def make_loader(cfg: ModelConfig, sources: Sequence[SourceSpec], *, window: int, batch_size: int,
                seed: int, loss_weights: LossWeights = LossWeights(),
                shard_index: int | None = None, shard_count: int | None = None,
                num_threads: int = 2, prefetch: int = 8):
  """Infinite iterator of {'tokens': int32 [B, 17, window], 'weights': float32 [B, 17, window]}.

  Deterministic given `seed` (and the shard); `get_state()` / `set_state(state)` resume exactly.
  shard_index / shard_count default to jax.process_index() / jax.process_count().
  """
  import grain
  ds = make_dataset(cfg, sources, window=window, batch_size=batch_size, seed=seed,
                    loss_weights=loss_weights, shard_index=shard_index, shard_count=shard_count)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
