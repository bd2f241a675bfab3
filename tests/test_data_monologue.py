"""Natural-monologue layout on hand-made cases: every token and WAIT position, push, cut."""

import numpy as np
import pytest

from flmjax.data.monologue import layout_monologue

W = 99  # WAIT


def expect(num_frames, placed):
  out = np.full(num_frames, W, np.int32)
  for pos, tok in placed.items():
    out[pos] = tok
  return out


def test_lead_positions():
  text, pushed, cut = layout_monologue([(5, 9, [10, 11, 12]), (15, 20, [20, 21])], 24, 'lead', 2, W)
  np.testing.assert_array_equal(text, expect(24, {3: 10, 4: 11, 5: 12, 13: 20, 14: 21}))
  assert (pushed, cut) == (0, 0)


def test_lead_clamps_at_zero():
  text, pushed, cut = layout_monologue([(1, 4, [7, 8])], 6, 'lead', 3, W)
  np.testing.assert_array_equal(text, expect(6, {0: 7, 1: 8}))
  assert (pushed, cut) == (0, 0)


def test_trail_positions():
  text, pushed, cut = layout_monologue([(2, 5, [1, 2, 3]), (7, 10, [4])], 14, 'trail', 1, W)
  np.testing.assert_array_equal(text, expect(14, {6: 1, 7: 2, 8: 3, 11: 4}))
  assert (pushed, cut) == (0, 0)


def test_trail_zero_offset_starts_at_exclusive_end():
  text, _, _ = layout_monologue([(0, 3, [5])], 5, 'trail', 0, W)
  np.testing.assert_array_equal(text, expect(5, {3: 5}))


def test_push_on_overlap_trail():
  # First text covers 3..7; the second would start at 6, so it is pushed 2 frames to 8.
  text, pushed, cut = layout_monologue([(0, 3, [1, 2, 3, 4, 5]), (5, 6, [8, 9])], 12, 'trail', 0, W)
  np.testing.assert_array_equal(text, expect(12, {3: 1, 4: 2, 5: 3, 6: 4, 7: 5, 8: 8, 9: 9}))
  assert (pushed, cut) == (2, 0)


def test_push_accumulates_lead():
  sentences = [(4, 8, [1, 2, 3, 4, 5, 6]), (6, 7, [7]), (9, 12, [8, 9])]
  text, pushed, cut = layout_monologue(sentences, 16, 'lead', 0, W)
  # 1..6 at 4..9; [7] wanted 6 -> 10 (push 4); [8, 9] wanted 9 -> 11 (push 2).
  np.testing.assert_array_equal(
    text, expect(16, {4: 1, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6, 10: 7, 11: 8, 12: 9})
  )
  assert (pushed, cut) == (6, 0)


def test_cut_at_window_end():
  text, pushed, cut = layout_monologue([(5, 8, [1, 2, 3, 4]), (9, 9, [5, 6])], 10, 'trail', 0, W)
  # [1..4] at 8, 9 then cut 2; [5, 6] would start at 12 (pushed from 9): all cut.
  np.testing.assert_array_equal(text, expect(10, {8: 1, 9: 2}))
  assert cut == 4
  assert pushed == 3


def test_sentences_are_laid_in_start_order():
  a = layout_monologue([(8, 10, [3]), (1, 3, [2])], 12, 'lead', 0, W)
  b = layout_monologue([(1, 3, [2]), (8, 10, [3])], 12, 'lead', 0, W)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[0], expect(12, {1: 2, 8: 3}))


def test_bad_mode_and_offset():
  with pytest.raises(ValueError, match="mode 'middle' is not one of"):
    layout_monologue([], 4, 'middle', 0, W)
  with pytest.raises(ValueError, match='offset -1 is negative'):
    layout_monologue([], 4, 'lead', -1, W)
  with pytest.raises(ValueError, match=r'sentence \(5, 3\) ends before it starts'):
    layout_monologue([(5, 3, [1])], 8, 'lead', 0, W)
