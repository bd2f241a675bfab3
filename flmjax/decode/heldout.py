"""Full-duplex chat on held-out conversations: what the trained model says, and how often it is
right. Every conversation streams through one batched StreamingDecoder, one user frame a step."""
from __future__ import annotations

import json
import os

import numpy as np

from flmjax.decode.decoder import StreamingDecoder
from flmjax.decode.sampling import SamplingConfig


def split_on_wait(text_ids, cfg) -> list[list[int]]:
  """Splits a streamed monologue [F] into its sentences: the runs of tokens between WAITs."""
  sentences, current = [], []
  for t in list(text_ids) + [cfg.text_wait_id]:
    if t in (cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id):
      if current:
        sentences.append(current)
      current = []
    else:
      current.append(int(t))
  return sentences


def read_conversations(manifest: str, limit: int, num_codebooks: int) -> list[dict]:
  """The first `limit` duplex lines: user codes [C, F] and the reference model/user sentences."""
  root = os.path.dirname(os.path.abspath(manifest))
  out = []
  with open(manifest) as f:
    for line in f:
      item = json.loads(line)
      if item.get('kind') != 'duplex' or 'codes' not in item:
        continue
      user = np.load(os.path.join(root, item['codes']['user']))[:num_codebooks]
      user = user.astype(np.int32)
      said = lambda who: [s['text'] for s in item['segments'] if s['speaker'] == who]
      out.append({'id': item['id'], 'user_codes': user, 'user': said('user'),
                  'reference': said('model')})
      if len(out) == limit:
        break
  if not out:
    raise ValueError(f'{manifest}: no duplex conversations with codes')
  return out


def chat_heldout(model, manifest: str, tokenizer, *, limit: int = 16, tail: int = 12,
                 sampling: SamplingConfig | None = None) -> dict:
  """Streams `limit` held-out conversations at once; returns transcripts and turn accuracy.

  A model turn counts as right when the i-th sentence of its monologue equals the i-th reference
  answer exactly.
  """
  cfg = model.cfg
  convs = read_conversations(manifest, limit, cfg.num_codebooks)
  frames = max(c['user_codes'].shape[1] for c in convs) + tail
  user = np.full((len(convs), cfg.num_codebooks, frames), cfg.audio_pad_id, np.int32)
  for b, c in enumerate(convs):
    user[b, :, :c['user_codes'].shape[1]] = c['user_codes']
  sampling = sampling or SamplingConfig(greedy=True, repetition_penalty_text=1.0,
                                        repetition_penalty_audio=1.0)
  decoder = StreamingDecoder(model, sampling, max_len=frames)
  state = decoder.init(len(convs))
  text = [[] for _ in convs]
  for f in range(frames):
    state, out, valid = decoder.step(state, user[:, :, f])
    out, valid = np.asarray(out), np.asarray(valid)
    for b in np.flatnonzero(valid):
      text[b].append(int(out[b, 0]))
  right = total = 0
  for c, ids in zip(convs, text):
    c['said'] = [tokenizer.decode(s) for s in split_on_wait(ids, cfg)]
    c['text_ids'] = ids
    total += len(c['reference'])
    right += sum(a == b for a, b in zip(c['said'], c['reference']))
    del c['user_codes']
  return {'conversations': convs, 'turns': total, 'right': right,
          'turn_accuracy': right / max(total, 1)}
