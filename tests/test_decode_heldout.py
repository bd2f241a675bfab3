"""Chat on held-out conversations: sentence splitting, scoring, and the batched stream."""
import json

import numpy as np
import pytest

from flmjax.decode.heldout import chat_heldout, split_on_wait


def test_split_on_wait_split_on_wait(tiny_model):
  cfg = tiny_model.cfg
  W = cfg.text_wait_id
  ids = [W, 5, 6, W, W, 7, cfg.text_eos_id, 8, 9, 10]
  assert split_on_wait(ids, cfg) == [[5, 6], [7], [8, 9, 10]]
  assert split_on_wait([W, W], cfg) == []


class WordTokenizer:
  def decode(self, ids):
    return ' '.join(f'w{i}' for i in ids)


def test_chat_heldout_scores_turns(tiny_model, tmp_path):
  rng = np.random.default_rng(0)
  lines = []
  for i, frames in enumerate((6, 9)):
    np.save(tmp_path / f'u{i}.npy', rng.integers(0, 2048, (8, frames)))
    lines.append({'id': f'c{i}', 'kind': 'duplex', 'codes': {'user': f'u{i}.npy', 'model': 'x'},
                  'segments': [{'speaker': 'user', 'text': 'q'},
                               {'speaker': 'model', 'text': 'impossible answer'}]})
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(l) for l in lines))
  result = chat_heldout(tiny_model, str(tmp_path / 'm.jsonl'), WordTokenizer(), tail=3)
  assert result['turns'] == 2 and result['right'] == 0 and result['turn_accuracy'] == 0.0
  for conv in result['conversations']:
    assert all(s.startswith('w') for s in conv['said'])  # decoded through the tokenizer
  # The same (deterministic, greedy) stream scored against what it said: now one turn is right.
  said = result['conversations'][0]['said']
  assert said, 'the random tiny model should say something'
  lines[0]['segments'][1]['text'] = said[0]
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(l) for l in lines))
  again = chat_heldout(tiny_model, str(tmp_path / 'm.jsonl'), WordTokenizer(), tail=3)
  assert (again['right'], again['turns']) == (1, 2) and again['turn_accuracy'] == 0.5
  with pytest.raises(ValueError, match='no duplex conversations'):
    (tmp_path / 'e.jsonl').write_text(json.dumps({'kind': 'tts_asr'}))
    chat_heldout(tiny_model, str(tmp_path / 'e.jsonl'), WordTokenizer())
