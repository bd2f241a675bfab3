"""The natural monologue: sentence-level text laid on the text channel (docs/architecture.md §7).

Tokens of a sentence sit contiguously, one per frame; every other frame is WAIT. In "lead" mode
(TTS-style) a sentence's text starts `offset` frames before its speech; in "trail" mode (ASR-style)
`offset` frames after its speech ends. Text never overwrites text: a sentence that would start
before the previous one's text ended is pushed right after it. Text that runs past the audio may
extend the sample (`max_frames`): trimmed ASR utterances often end right at the last word, and
their only sentence would otherwise be cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MODES = ('lead', 'trail')


class Placed(NamedTuple):
  frame: int  # the frame of the sentence's first token (it may lie past the audio)
  pushed: int  # frames it was pushed to clear the previous sentence's text
  tokens: np.ndarray  # int32 [n]


def place_sentences(
  sentences: Sequence[tuple[int, int, Sequence[int]]], mode: str, offset: int
) -> list[Placed]:
  """Where each sentence's text starts, in order of start_frame; nothing is cut here.

  Args:
    sentences: (start_frame, end_frame, token_ids) per sentence; end_frame is exclusive (the first
      frame after the speech).
    mode: 'lead' (first token at start_frame - offset, clamped at 0) or 'trail' (at end_frame +
      offset).
    offset: frames of lead or trail, >= 0.
  """
  if mode not in MODES:
    raise ValueError(f'layout_monologue: mode {mode!r} is not one of {MODES}')
  if offset < 0:
    raise ValueError(f'layout_monologue: offset {offset} is negative')
  placed, cursor = [], 0  # cursor: first frame free of text
  for start, end, tokens in sorted(sentences, key=lambda s: (s[0], s[1])):
    if end < start:
      raise ValueError(f'layout_monologue: sentence ({start}, {end}) ends before it starts')
    pos = max(0, start - offset) if mode == 'lead' else end + offset
    pushed = max(0, cursor - pos)
    tokens = np.asarray(tokens, np.int32)
    placed.append(Placed(pos + pushed, pushed, tokens))
    cursor = pos + pushed + len(tokens)
  return placed


def fill_text(
  placed: Sequence[Placed], num_frames: int, wait_id: int, max_frames: int | None = None
) -> tuple[np.ndarray, int]:
  """The text channel of placed sentences: (text_ids int32 [F], cut_tokens).

  F is num_frames, grown up to max_frames (default: no growth) to hold text that runs past the
  audio. Tokens at or past F are dropped and counted in cut_tokens.
  """
  end = max((p.frame + len(p.tokens) for p in placed), default=0)
  length = max(num_frames, min(end, num_frames if max_frames is None else max_frames))
  text_ids = np.full((length,), wait_id, np.int32)  # [F]
  cut = 0
  for p in placed:
    keep = max(0, min(len(p.tokens), length - p.frame))
    text_ids[p.frame : p.frame + keep] = p.tokens[:keep]
    cut += len(p.tokens) - keep
  return text_ids, cut


def layout_monologue(
  sentences: Sequence[tuple[int, int, Sequence[int]]],
  num_frames: int,
  mode: str,
  offset: int,
  wait_id: int,
  *,
  max_frames: int | None = None,
) -> tuple[np.ndarray, int, int]:
  """Lays sentences on the text channel (`place_sentences`, then `fill_text`).

  Returns:
    text_ids int32 [F] (F = num_frames, or more up to max_frames when text runs past the audio),
    pushed_frames (sum of the pushes on overlap), cut_tokens (tokens that fell at or past F and
    were dropped).
  """
  placed = place_sentences(sentences, mode, offset)
  text_ids, cut = fill_text(placed, num_frames, wait_id, max_frames)
  return text_ids, sum(p.pushed for p in placed), cut
