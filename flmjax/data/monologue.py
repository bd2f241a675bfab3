"""The natural monologue: sentence-level text laid on the text channel (ARCHITECTURE.md §7).

Tokens of a sentence sit contiguously, one per frame; every other frame is WAIT. In "lead" mode
(TTS-style) a sentence's text starts `offset` frames before its speech; in "trail" mode (ASR-style)
`offset` frames after its speech ends. Text never overwrites text: a sentence that would start
before the previous one's text ended is pushed right after it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ('lead', 'trail')


def layout_monologue(sentences: Sequence[tuple[int, int, Sequence[int]]], num_frames: int,
                     mode: str, offset: int, wait_id: int) -> tuple[np.ndarray, int, int]:
  """Lays sentences on the text channel.

  Args:
    sentences: (start_frame, end_frame, token_ids) per sentence; end_frame is exclusive (the first
      frame after the speech). Laid out in order of start_frame.
    num_frames: length of the text channel.
    mode: 'lead' (first token at start_frame - offset, clamped at 0) or 'trail' (at end_frame +
      offset).
    offset: frames of lead or trail, >= 0.
  Returns:
    text_ids int32 [num_frames], pushed_frames (sum of the pushes on overlap), cut_tokens (tokens
    that fell at or past num_frames and were dropped).
  """
  if mode not in MODES:
    raise ValueError(f'layout_monologue: mode {mode!r} is not one of {MODES}')
  if offset < 0:
    raise ValueError(f'layout_monologue: offset {offset} is negative')
  text_ids = np.full((num_frames,), wait_id, np.int32)  # [F]
  pushed = cut = 0
  cursor = 0  # first frame free of text
  for start, end, tokens in sorted(sentences, key=lambda s: (s[0], s[1])):
    if end < start:
      raise ValueError(f'layout_monologue: sentence ({start}, {end}) ends before it starts')
    pos = max(0, start - offset) if mode == 'lead' else end + offset
    if pos < cursor:
      pushed += cursor - pos
      pos = cursor
    tokens = np.asarray(tokens, np.int32)
    keep = max(0, min(len(tokens), num_frames - pos))
    text_ids[pos:pos + keep] = tokens[:keep]
    cut += len(tokens) - keep
    cursor = pos + len(tokens)
  return text_ids, pushed, cut
