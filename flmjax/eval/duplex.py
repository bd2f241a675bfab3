"""`evaluate_duplex`: held-out conversations streamed through a model, scored for turn-taking and
for content (exact answers). The teacher-forced accuracies are teacher_forced.py's."""

from __future__ import annotations

import numpy as np

from flmjax.codec.base import playable
from flmjax.codec.toy import ToyCodec
from flmjax.eval.activity import speech_activity
from flmjax.eval.stream import read_conversations, stream
from flmjax.eval.turn_taking import EVENT_KINDS, latency_summary, turn_taking
from flmjax.eval.words import words_from_text


def split_on_wait(text_ids, cfg) -> list[list[int]]:
  """A streamed monologue [F] -> its sentences: the runs of tokens between WAITs (and specials)."""
  sentences, current = [], []
  for t in list(text_ids) + [cfg.text_wait_id]:
    if t in (cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id):
      if current:
        sentences.append(current)
      current = []
    else:
      current.append(int(t))
  return sentences


def decode_text(ids, tokenizer, cfg) -> str:
  """The words of a stretch of monologue [n]: its sentences decoded, joined by spaces (ids past
  the tokenizer's vocabulary are model-only specials, dropped)."""
  vocab = tokenizer.vocab_size
  sentences = [[i for i in s if i < vocab] for s in split_on_wait(ids, cfg)]
  return ' '.join(tokenizer.decode(s) for s in sentences if s)


def score_turns(text_ids: np.ndarray, conv: dict, tokenizer, cfg) -> list[dict]:
  """The answer turns of a conversation: for each turn_end (start, end) whose window holds a model
  segment that starts in it and is not cut by the user's next onset, what the model said in
  frames [start, end) against that segment's text. A turn is right when they are equal."""
  turns = []
  answers = [s for s in conv['segments'] if s['speaker'] == 'model']
  for kind, start, end in conv['events']:
    if kind != 'turn_end':
      continue
    ref = [s for s in answers if start <= s['start'] < end and s['end'] <= end]
    if not ref:
      continue
    said = decode_text(text_ids[start:end], tokenizer, cfg)
    turns.append(
      {'frame': start, 'said': said, 'reference': ref[0]['text'], 'right': said == ref[0]['text']}
    )
  return turns


def user_activity(conv: dict) -> np.ndarray:
  """bool [F]: the frames inside the user's segments."""
  active = np.zeros(conv['user'].shape[1], bool)
  for s in conv['segments']:
    if s['speaker'] == 'user':
      active[s['start'] : s['end']] = True
  return active


def pool(metrics: list[dict]) -> dict:
  """turn_taking results of many conversations -> one, as if their events were scored together."""
  counts = {k: sum(m['counts'][k] for m in metrics) for k in EVENT_KINDS}
  rate = lambda key, kind: (
    sum((m[key] or 0) * m['counts'][kind] for m in metrics) / counts[kind] if counts[kind] else None
  )
  latencies = [x for m in metrics for x in m['response_latency_ms_all']]
  stops = [x for m in metrics for x in m['interrupt_stop_latency_ms_all']]
  median = lambda v: float(np.median(v)) if v else None
  return {
    'rules': metrics[0]['rules'] if metrics else 'flmjax',
    'takeover_rate': rate('takeover_rate', 'turn_end'),
    **latency_summary(latencies),
    'pause_takeover_rate': rate('pause_takeover_rate', 'pause'),
    'interrupt_stop_rate': rate('interrupt_stop_rate', 'interrupt'),
    'interrupt_stop_latency_ms': median(stops),
    'interrupt_stop_latency_ms_all': stops,
    'counts': counts,
  }


def evaluate_duplex(
  model,
  manifest: str,
  tokenizer,
  *,
  limit: int | None = None,
  batch_size: int | None = None,
  codec=None,
  sampling=None,
  progress: bool = False,
  conversations: list[dict] | None = None,
  decoder=None,
  rules: str = 'flmjax',
  lead_frames: int = 2,
  vad: str = 'energy',
) -> dict:
  """Streams the held-out conversations of `manifest` (greedy by default) and scores them.

  codec: a Mimi codec reads audio lines and measures the model's speech activity from its decoded
  audio (its energy, or with vad='silero' Silero VAD); None uses the toy speech's silence code
  (and ToyCodec for audio lines). conversations:
  read_conversations' result, read once for many models; decoder: see stream. rules: how
  'turn_taking' scores ('flmjax' or 'fdb', see turn_taking); 'turn_taking_fdb' always holds FDB's
  rules, from the model's words (flmjax.eval.words, text leading speech by lead_frames).
  Returns {'turn_taking': pooled metrics, 'turn_taking_fdb', 'turns', 'right', 'turn_accuracy',
  'conversations': per conversation its id, events, activity, text_ids, words, turns and
  metrics}.
  """
  cfg = model.cfg
  convs = conversations or read_conversations(manifest, cfg.num_codebooks, limit=limit, codec=codec)
  outputs, _ = stream(
    model,
    [c['user'] for c in convs],
    sampling=sampling,
    batch_size=batch_size,
    progress=progress,
    desc='eval duplex',
    decoder=decoder,
  )
  per, metrics, fdb_metrics = [], [], []
  for conv, out in zip(convs, outputs):
    text_ids, speak = out[0], out[1:]  # [F], [C, F]
    if codec is None or isinstance(codec, ToyCodec):
      active = speech_activity(speak)
    else:  # Mimi: the energy of the decoded audio
      wave = codec.decode(playable(speak))
      active = speech_activity(wave=wave, vad=vad, sample_rate=codec.sample_rate)
      active = active[: speak.shape[1]]
    words = words_from_text(text_ids, active, tokenizer, cfg, lead_frames)
    spans = [(w['start'], w['end']) for w in words]
    fdb = turn_taking(active, conv['events'], rules='fdb', words=spans)
    m = fdb if rules == 'fdb' else turn_taking(active, conv['events'], rules=rules)
    metrics.append(m)
    fdb_metrics.append(fdb)
    turns = score_turns(text_ids, conv, tokenizer, cfg)
    per.append(
      {
        'id': conv['id'],
        'events': [list(e) for e in conv['events']],
        'segments': conv['segments'],
        'model_active': active.astype(int).tolist(),
        'user_active': user_activity(conv).astype(int).tolist(),
        'text_ids': text_ids.tolist(),
        'words': words,
        'turns': turns,
        'turn_taking': m,
      }
    )
  right = sum(t['right'] for c in per for t in c['turns'])
  total = sum(len(c['turns']) for c in per)
  return {
    'turn_taking': pool(metrics),
    'turn_taking_fdb': pool(fdb_metrics),
    'turns': total,
    'right': right,
    'turn_accuracy': right / total if total else None,
    'conversations': per,
  }


def check_vocab(cfg, tokenizer, where: str) -> None:
  """The data's tokenizer must fit under the checkpoint's text specials."""
  limit = min(cfg.text_wait_id, cfg.text_bos_id, cfg.text_eos_id, cfg.vocab_size)
  if tokenizer.vocab_size > limit:
    raise ValueError(
      f"{where}: the data's tokenizer has {tokenizer.vocab_size} ids, but the "
      f"checkpoint's text vocabulary holds {cfg.vocab_size} with specials from "
      f'{limit}: the checkpoint and the data come from different vocabularies'
    )
