"""Held-out conversations streamed through the batched decoder, one user frame a step."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from flmjax.data.manifest import ManifestError, manifest_lines
from flmjax.eval.turn_taking import events_from_segments, seconds_to_frame


def _json_object(line: str, where: str) -> dict:
  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: invalid JSON ({e.msg})') from None
  if not isinstance(item, dict):
    raise ValueError(f'{where}: not a JSON object (one per line)')
  return item


def read_conversations(
  manifest: str, num_codebooks: int, *, limit: int | None = None, codec=None
) -> list[dict]:
  """The duplex lines of a manifest: {'id', 'user' codes int32 [C, F], 'events', 'segments' (in
  frames: speaker, start, end, text)}. `codes` lines give the user's .npy; `audio` lines (stereo:
  channel 1 is the user) go through `codec` (default: the synthetic corpus's ToyCodec)."""
  root = os.path.dirname(os.path.abspath(manifest))
  out = []
  for number, line in manifest_lines(manifest):
    if isinstance(line, ManifestError):
      raise line
    item = _json_object(line, f'{manifest}:{number}')
    if item.get('kind') != 'duplex':
      continue
    if 'codes' in item:
      from flmjax.data.manifest import read_npy

      user = read_npy(os.path.join(root, item['codes']['user']))
    elif 'audio' in item:
      from flmjax.data.audio import read_audio

      if codec is None:
        from flmjax.codec.toy import ToyCodec

        codec = ToyCodec()
      wave = read_audio(
        os.path.join(root, item['audio']), channels=2, target_rate=codec.sample_rate
      )[1]  # [S]: channel 1 is the user
      user = codec.encode(wave)
    else:
      raise ValueError(f'{manifest}:{number}: a duplex line needs "codes" or "audio"')
    if user.ndim != 2 or user.shape[0] < num_codebooks:
      raise ValueError(
        f'{manifest}:{number}: user codes of shape {user.shape}; the checkpoint '
        f'needs [{num_codebooks}, frames]'
      )
    user = np.asarray(user[:num_codebooks], np.int32)
    frames = user.shape[1]
    segments = [
      {
        'speaker': s['speaker'],
        'start': seconds_to_frame(s['start']),
        'end': seconds_to_frame(s['end']),
        'text': s['text'],
      }
      for s in item.get('segments', [])
    ]
    events = (
      [tuple(e) for e in item['events']]
      if 'events' in item
      else events_from_segments(item.get('segments', []), frames)
    )
    out.append(
      {
        'id': item.get('id', f'line{number}'),
        'user': user,
        'events': events,
        'segments': segments,
      }
    )
    if limit is not None and len(out) == limit:
      break
  if not out:
    raise ValueError(f'{manifest}: no duplex conversations')
  return out


def stream(
  model,
  users: list[np.ndarray],
  *,
  sampling=None,
  batch_size: int | None = None,
  progress: bool = False,
  desc: str = 'stream',
  decoder=None,
) -> tuple[list[np.ndarray], int]:
  """Streams every user side [C, F_i] (batch_size at a time, PAD after its end) and returns
  (per conversation the un-delayed model frames [1 + C, F_i] = [text; speak codes], the number of
  steps before the first output: a live listener hears frame f at step f + that).

  decoder: a StreamingDecoder built before for a model of the same config, long enough
  (max_len); it then runs `model`'s weights (StreamingDecoder.load_weights: a LoRA model
  merged, placed on the decoder's mesh) with the functions it has compiled already, and its own
  sampling (`sampling` is for a decoder built here)."""
  from tqdm import tqdm

  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig

  cfg = model.cfg
  sampling = sampling or SamplingConfig(
    greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0
  )
  batch_size = min(batch_size or len(users), len(users))
  tail = cfg.max_delay + 1  # enough PAD steps for every frame of the user's span to come out
  steps = max(u.shape[1] for u in users) + tail
  if decoder is None:
    decoder = StreamingDecoder(model, sampling, max_len=steps)
  else:
    if decoder.max_len < steps:
      raise ValueError(f'stream: the decoder holds {decoder.max_len} frames; need {steps}')
    decoder.load_weights(model)  # merged if LoRA, on the decoder's mesh; nothing recompiles
  outputs, lag = [None] * len(users), None
  bar = tqdm(
    total=sum(u.shape[1] for u in users),
    desc=desc,
    unit='frame',
    disable=not progress,
    file=sys.stderr,
  )
  for first in range(0, len(users), batch_size):
    chunk = users[first : first + batch_size]
    frames = max(u.shape[1] for u in chunk) + tail
    user = np.full((batch_size, cfg.num_codebooks, frames), cfg.audio_pad_id, np.int32)
    for b, u in enumerate(chunk):
      user[b, :, : u.shape[1]] = u
    state = decoder.init(batch_size)
    rows = [[] for _ in range(batch_size)]
    for t in range(frames):
      state, out, valid = decoder.step(state, user[:, :, t])
      out, valid = np.asarray(out), np.asarray(valid)
      if lag is None and valid.any():
        lag = t
      for b in np.flatnonzero(valid):
        rows[b].append(out[b])
      bar.update(sum(t < u.shape[1] for u in chunk))
    for b, u in enumerate(chunk):
      outputs[first + b] = np.stack(rows[b][: u.shape[1]], axis=1).astype(np.int32)  # [1+C, F]
  bar.close()
  return outputs, int(lag)
