"""The delayed token grid and its loss weights: the ONLY place that applies delays to data.

Frame f of channel c sits at column f + cfg.grid_offsets[c] (docs/architecture.md §1, §4).
Column 0 is the initial column (text WAIT, speak PAD, listen acoustic PAD; listen semantic holds
the user's frame 0, as the official LMGen writes it). Decoding's un-delay must agree with `undelay`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flmjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Per-target loss weights (docs/architecture.md §4); each stage may set its own."""

  text: float = 1.0
  wait: float = 0.5
  semantic: float = 1.0
  acoustic: float = 0.1

  def __post_init__(self):
    for name in ('text', 'wait', 'semantic', 'acoustic'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and 0 <= value < float('inf')):
        raise ValueError(
          f'LossWeights.{name} is {value!r}; a loss weight must be a finite number >= 0'
        )


def _blank(cfg: ModelConfig, num_columns: int) -> np.ndarray:
  """int32 [17, num_columns] holding the initial column everywhere (WAIT text, PAD audio)."""
  return np.repeat(np.asarray(cfg.initial_column, np.int32)[:, None], num_columns, axis=1)


def _check_ids(name: str, ids: np.ndarray, upper: int):
  if ids.size and (ids.min() < 0 or ids.max() >= upper):
    bad = ids[(ids < 0) | (ids >= upper)].ravel()[0]
    raise ValueError(f'build_grid: {name} holds id {int(bad)}, outside 0..{upper - 1}')


def _frames(cfg: ModelConfig, text_ids, speak, listen) -> tuple[np.ndarray, np.ndarray]:
  """Stacks the streams frame-wise: (frames int32 [17, F], has_data bool [17])."""
  k = cfg.num_codebooks
  lengths = {}
  if text_ids is not None:
    text_ids = np.asarray(text_ids)
    if text_ids.ndim != 1:
      raise ValueError(f'build_grid: text_ids must be [F], got shape {text_ids.shape}')
    lengths['text_ids'] = text_ids.shape[0]
  for name, codes in (('speak', speak), ('listen', listen)):
    if codes is not None:
      codes = np.asarray(codes)
      if codes.ndim != 2 or codes.shape[0] != k:
        raise ValueError(f'build_grid: {name} must be [{k}, F], got shape {codes.shape}')
      lengths[name] = codes.shape[1]
  if not lengths:
    raise ValueError('build_grid: give at least one of text_ids, speak, listen')
  if len(set(lengths.values())) != 1:
    raise ValueError(f'build_grid: streams disagree on the number of frames: {lengths}')
  num_frames = next(iter(lengths.values()))
  frames = _blank(cfg, num_frames)  # [17, F]
  has_data = np.zeros(cfg.num_channels, bool)
  if text_ids is not None:
    _check_ids('text_ids', text_ids, cfg.vocab_size)
    frames[0], has_data[0] = text_ids, True
  for start, codes, name in ((1, speak, 'speak'), (1 + k, listen, 'listen')):
    if codes is not None:
      _check_ids(name, np.asarray(codes), cfg.audio_vocab_size)
      frames[start : start + k], has_data[start : start + k] = codes, True
  return frames, has_data


def build_grid(
  cfg: ModelConfig,
  text_ids,
  speak,
  listen,
  loss_weights: LossWeights = LossWeights(),
  num_columns: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Delays one sample's streams onto the grid.

  Args:
    text_ids: int [F] monologue (WAIT where no token) or None (no text: WAIT, never a target).
    speak, listen: int [8, F] codes or None (PAD, never a target).
    num_columns: grid length T; default F + max(grid_offsets), just enough for every frame.
  Returns:
    tokens int32 [17, T] and weights float32 [17, T], where weights[c, j] weighs predicting
    tokens[c, j] from column j-1 (0 at column 0, on listen channels, on PAD/EMP, outside the
    sample).
  """
  frames, has_data = _frames(cfg, text_ids, speak, listen)  # [17, F], [17]
  num_frames = frames.shape[1]
  offsets = np.asarray(cfg.grid_offsets)  # [17]
  if num_columns is None:
    num_columns = num_frames + int(offsets.max())
  tokens = _blank(cfg, num_columns)  # [17, T]
  inside = np.zeros((cfg.num_channels, num_columns), bool)  # the column holds a frame of the sample
  for c, off in enumerate(offsets):
    n = max(0, min(num_frames, num_columns - off))
    tokens[c, off : off + n] = frames[c, :n]
    inside[c, off : off + n] = has_data[c]
  weights = np.zeros((cfg.num_channels, num_columns), np.float32)  # [17, T]
  w = loss_weights
  k = cfg.num_codebooks
  weights[0] = np.where(tokens[0] == cfg.text_wait_id, w.wait, w.text)
  weights[1] = w.semantic
  weights[2 : 1 + k] = w.acoustic
  audio = tokens[1 : 1 + k]
  weights[1 : 1 + k] *= (audio != cfg.audio_pad_id) & (audio != cfg.audio_emp_id)
  weights *= inside
  weights[1 + k :] = 0.0  # listen: input only
  weights[:, 0] = 0.0  # nothing predicts the initial column
  return tokens, weights


def undelay(cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
  """Inverse of `build_grid`: int32 [17, T] grid -> int32 [17, F] frames, F = T - max offset.

  Frame f of channel c is tokens[c, f + grid_offsets[c]]; only frames complete on every channel
  are returned.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] != cfg.num_channels:
    raise ValueError(f'undelay: tokens must be [{cfg.num_channels}, T], got shape {tokens.shape}')
  offsets = cfg.grid_offsets
  num_frames = max(0, tokens.shape[1] - max(offsets))
  frames = [tokens[c, off : off + num_frames] for c, off in enumerate(offsets)]
  return np.stack(frames).astype(np.int32)  # [17, F]


def pad_grid(
  cfg: ModelConfig, tokens: np.ndarray, weights: np.ndarray, start: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
  """Columns [start, start + window) of a grid, padded past its end (WAIT/PAD, weight 0).

  The window's first column has weight 0: no column inside the window predicts it.
  """
  out_t = _blank(cfg, window)  # [17, W]
  out_w = np.zeros((cfg.num_channels, window), np.float32)  # [17, W]
  part_t, part_w = tokens[:, start : start + window], weights[:, start : start + window]
  out_t[:, : part_t.shape[1]] = part_t
  out_w[:, : part_w.shape[1]] = part_w
  out_w[:, 0] = 0.0
  return out_t, out_w
