"""grain input pipeline: prepared ArrayRecord shards -> layout -> grids -> random windows ->
batches.

Per source: windows of this host's records (a long record yields several, so each frame is
trained about once per epoch) -> shuffle (reshuffled each epoch) -> repeat forever -> read the
record -> random_map(decode, stage layout, build_grid, random window). Sources are mixed by
weight, then batched. Everything is a grain MapDataset indexed from 0, so the iterator state is one
index and restoring it resumes exactly; every random choice comes from grain's per-index seeded RNG.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flmjax.config import ModelConfig
from flmjax.data import records as rec_lib
from flmjax.data.grid import LossWeights, build_grid, pad_grid
from flmjax.data.monologue import fill_text, place_sentences

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
  # Duplex samples: a window that starts inside a conversation trains only the targets from the
  # first user turn that starts inside it, so no answer is trained without its whole question in
  # view (a random window otherwise often cuts a question and keeps its answer).
  whole_turns: bool = False

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f'SourceSpec({self.path!r}): layout {self.layout!r} is not one of {LAYOUTS}')
    if self.speech_stream not in SPEECH_STREAMS:
      raise ValueError(
        f'SourceSpec({self.path!r}): speech_stream {self.speech_stream!r} is not '
        f'one of {SPEECH_STREAMS}'
      )
    if self.offset_frames < 0:
      raise ValueError(f'SourceSpec({self.path!r}): offset_frames {self.offset_frames} is negative')
    if not self.weight > 0:
      raise ValueError(f'SourceSpec({self.path!r}): weight {self.weight} must be positive')


COUNTS = ('pushed_frames', 'cut_tokens', 'extended_frames')  # per window, see _WindowedGrid


@dataclasses.dataclass(frozen=True)
class SampleGrid:
  """One sample laid out under its stage's layout, before windowing."""

  tokens: np.ndarray  # int32 [17, T]
  weights: np.ndarray  # float32 [17, T]
  num_frames: int  # frames of audio; text past them extends the sample (PAD audio, weight 0)
  placed: list  # monologue.Placed per sentence


def record_grid(
  cfg: ModelConfig,
  record: rec_lib.Record,
  spec: SourceSpec,
  mode: str,
  loss_weights: LossWeights,
  max_extend: int = 0,
) -> SampleGrid:
  """A whole sample's grid under the stage layout.

  Text that runs past the last audio frame (ASR-style trailing text of trimmed audio) extends the
  sample by up to `max_extend` frames of PAD audio, which weighs 0, so that the monologue
  completes; tokens beyond that are cut.
  """
  if record.kind == 'duplex':
    mode = 'lead'
    speak, listen = record.codes['model'], record.codes['user']
  else:
    (speech,) = record.codes.values()
    speak, listen = (speech, None) if spec.speech_stream == 'speak' else (None, speech)
  placed = place_sentences(rec_lib.monologue_sentences(record), mode, spec.offset_frames)
  frames = record.num_frames
  text, _ = fill_text(placed, frames, cfg.text_wait_id, frames + max_extend)  # [F']
  extra = text.shape[0] - frames
  if extra:
    pad = lambda codes: (
      None
      if codes is None
      else np.pad(codes, ((0, 0), (0, extra)), constant_values=cfg.audio_pad_id)
    )  # [8, F']
    speak, listen = pad(speak), pad(listen)
  tokens, weights = build_grid(cfg, text, speak, listen, loss_weights)
  return SampleGrid(tokens, weights, frames, placed)


def windows_per_record(num_columns: np.ndarray, window: int) -> np.ndarray:
  """Windows a record yields per epoch, so that each of its targets is trained about once.

  A grid of T <= window columns fits one window. A longer one gets n = ceil((T + W - 3) / (W - 1))
  windows, each covering any given target with probability (W - 1) / (T + W - 3) (see
  `_WindowedGrid`): between 1 and 1.5 times per epoch in expectation, -> 1 for long records.
  """
  t = np.asarray(num_columns, np.int64)
  return np.where(t <= window, 1, -(-(t + window - 3) // (window - 1)))


class _WindowedGrid:
  """grain random_map: serialized record -> one random window of its grid, plus the monologue's
  pushed frames, cut tokens and extension frames that fall in the window's targets."""

  def __init__(self, cfg, spec, window, loss_weights):
    self.cfg, self.spec, self.window, self.loss_weights = cfg, spec, window, loss_weights

  def __call__(self, data: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = rec_lib.decode_record(data)
    mode = self.spec.layout
    if mode == 'mixed':
      mode = 'lead' if rng.random() < 0.5 else 'trail'
    sample = record_grid(self.cfg, record, self.spec, mode, self.loss_weights, self.window)
    size, w = sample.tokens.shape[1], self.window
    if size <= w:
      start, lo, hi = 0, 1, size  # the whole sample; column 0 is never a target
    else:
      # A window at `raw` trains targets raw+1 .. raw+W-1. raw is uniform over every start whose
      # targets meet the grid's (1 .. T-1), so each target is equally likely to be trained; a
      # window hanging over either end is moved inside and trains only its own targets.
      raw = int(rng.integers(2 - w, size - 1))
      start = min(max(raw, 0), size - w)
      lo, hi = max(raw, start) + 1, min(raw, start) + w  # targets [lo, hi)
    if self.spec.whole_turns and start > 0 and record.kind == 'duplex':
      lo = max(lo, self._first_turn(record, start, hi))
    tokens, weights = pad_grid(self.cfg, sample.tokens, sample.weights, start, w)
    weights[:, : lo - start] = 0.0
    weights[:, hi - start :] = 0.0
    text_col = self.cfg.grid_offsets[0]  # text frame f sits at column f + text_col
    last = sample.tokens.shape[1] - 1 - max(self.cfg.grid_offsets) + text_col  # last text column
    inside = lambda frame: lo <= min(frame + text_col, last) < hi
    ext = range(sample.num_frames + text_col, last + 1)  # text columns of the extension
    return {
      'tokens': tokens,
      'weights': weights,
      'pushed_frames': np.int32(sum(p.pushed for p in sample.placed if inside(p.frame))),
      'cut_tokens': np.int32(
        sum(
          max(0, p.frame + len(p.tokens) - 1 - last + text_col)
          for p in sample.placed
          if inside(p.frame)
        )
      ),
      'extended_frames': np.int32(len(range(max(lo, ext.start), min(hi, ext.stop)))),
    }

  def _first_turn(self, record: rec_lib.Record, start: int, end: int) -> int:
    """The grid column of the first user turn that starts at or after column `start` (the user's
    frame f sits at column f + its channel's offset), or `end` if none does."""
    listen = self.cfg.grid_offsets[1 + self.cfg.num_codebooks]
    columns = [f + listen for f in rec_lib.turn_starts(record) if f + listen >= start]
    return min(columns, default=end)


def _seed(seed: int, source: int, salt: int) -> int:
  return int(np.random.SeedSequence([seed, source, salt]).generate_state(1)[0])


def make_dataset(
  cfg: ModelConfig,
  sources: Sequence[SourceSpec],
  *,
  window: int,
  batch_size: int,
  seed: int,
  loss_weights: LossWeights = LossWeights(),
  shard_index: int | None = None,
  shard_count: int | None = None,
):
  """The batched grain MapDataset behind `make_loader` (infinite)."""
  import grain

  if not sources:
    raise ValueError('make_loader: no sources given')
  if window < 2 or batch_size < 1:
    raise ValueError(
      f'make_loader: need window >= 2 and batch_size >= 1 (got {window}, {batch_size})'
    )
  if shard_index is None or shard_count is None:
    import jax

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'make_loader: shard_index {shard_index} is outside 0..{shard_count - 1}')
  parts = []
  for i, spec in enumerate(sources):
    files = rec_lib.record_files(spec.path)
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
    records = records[shard_index::shard_count]  # each host reads its own records
    if len(records) == 0:
      raise ValueError(
        f'make_loader: {spec.path!r} has no records for shard {shard_index} of {shard_count}'
      )
    frames = rec_lib.record_frames(spec.path)[shard_index::shard_count]  # [records]
    if len(frames) != len(records):
      raise ValueError(
        f'make_loader: {spec.path!r} lists {len(frames)} record lengths for '
        f'{len(records)} records (run `flmjax data prepare` again)'
      )
    # One element per window: a long record yields several, each at its own random offset.
    owners = np.repeat(
      np.arange(len(records)), windows_per_record(frames + max(cfg.grid_offsets), window)
    )  # [windows]
    ds = grain.MapDataset.source(owners)
    ds = ds.shuffle(seed=_seed(seed, i, 0)).repeat(None)  # a new order every epoch
    ds = ds.map(lambda owner, records=records: records[int(owner)])
    ds = ds.random_map(_WindowedGrid(cfg, spec, window, loss_weights), seed=_seed(seed, i, 1))
    parts.append(ds)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in sources])
  return ds.batch(batch_size, drop_remainder=True)


def make_loader(
  cfg: ModelConfig,
  sources: Sequence[SourceSpec],
  *,
  window: int,
  batch_size: int,
  seed: int,
  loss_weights: LossWeights = LossWeights(),
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_threads: int = 2,
  prefetch: int = 8,
):
  """Infinite iterator of {'tokens': int32 [B, 17, window], 'weights': float32 [B, 17, window],
  'pushed_frames' / 'cut_tokens' / 'extended_frames': int32 [B]} (the monologue counts of each
  window's targets).

  Deterministic given `seed` (and the shard); `get_state()` / `set_state(state)` resume exactly.
  shard_index / shard_count default to jax.process_index() / jax.process_count().
  """
  import grain

  ds = make_dataset(
    cfg,
    sources,
    window=window,
    batch_size=batch_size,
    seed=seed,
    loss_weights=loss_weights,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
