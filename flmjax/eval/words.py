"""The model's words with times, from its own text stream (not an ASR): what `eval fdb` writes as
output.json and what `turn_taking(rules='fdb')` scores.

In the trained monologue layout each sentence's text leads its speech by `lead_frames` (the
embedded default: 2), so a word whose first token sits at text frame t is spoken from frame
t + lead_frames. A word ends where the next word of its sentence starts; a sentence's last word
ends where the model's speech activity stops (at least one frame after its start).
"""

from __future__ import annotations

import numpy as np

SOURCE = "flmjax text stream (the model's own text tokens, not an ASR), aligned to its speech"


def _sentences(text_ids, cfg):
  """(first frame, token ids) of each run of tokens between specials (WAIT, BOS, EOS)."""
  specials = (cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id)
  runs, start = [], None
  for f, t in enumerate(list(text_ids) + [cfg.text_wait_id]):
    if int(t) in specials:
      if start is not None:
        runs.append((start, [int(i) for i in text_ids[start:f]]))
      start = None
    elif start is None:
      start = f
  return runs


def words_from_text(text_ids, active, tokenizer, cfg, lead_frames: int = 2) -> list[dict]:
  """text_ids int [F] (the model's text stream, un-delayed) and its speech activity bool [F] ->
  [{'text', 'start', 'end'}] in frames, [start, end), sorted. Ids past the tokenizer's vocabulary
  (model-only specials) are dropped; a token starts a word when it adds one to the decoded text."""
  active = np.asarray(active, bool)
  frames = len(active)
  words = []
  for first, ids in _sentences(text_ids, cfg):
    starts, count = [], 0
    for k in range(len(ids)):
      kept = [i for i in ids[: k + 1] if i < tokenizer.vocab_size]
      n = len(tokenizer.decode(kept).split()) if kept else 0
      if n > count:
        starts.append(first + k + lead_frames)
        count = n
    kept = [i for i in ids if i < tokenizer.vocab_size]
    texts = tokenizer.decode(kept).split() if kept else []
    for j, (text, start) in enumerate(zip(texts, starts)):
      if j + 1 < len(starts):
        end = starts[j + 1]
      else:  # the sentence's last word: until the speech stops
        silent = np.flatnonzero(~active[start:]) if start < frames else np.zeros(1, np.int64)
        end = start + max(1, int(silent[0]) if silent.size else frames - start)
      words.append({'text': text, 'start': start, 'end': end})
  return sorted(words, key=lambda w: w['start'])


def output_json(words: list[dict], frame_rate: float, shift_frames: int = 0) -> dict:
  """Full-Duplex-Bench's output.json ({'text', 'chunks': [{'text', 'timestamp': [s, e]}]}, as
  its ASR step writes it), from frame-timed words shifted by shift_frames (a live session's
  decoder lag), labelled with where the words come from."""
  sec = lambda f: round((f + shift_frames) / frame_rate, 4)
  return {
    'text': ' '.join(w['text'] for w in words),
    'chunks': [{'text': w['text'], 'timestamp': [sec(w['start']), sec(w['end'])]} for w in words],
    'source': SOURCE,
  }
