"""Held-out conversations streamed through the batched decoder, one user frame a step."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from flmjax.codec.toy import ToyCodec
from flmjax.data.events import events_from_segments, seconds_to_frame
from flmjax.data.manifest import ManifestError, read_manifest, read_npy, read_waves


def read_conversations(
  manifest: str, num_codebooks: int, *, limit: int | None = None, codec=None
) -> list[dict]:
  """The duplex lines of a manifest: {'id', 'user' codes int32 [C, F], 'events', 'segments' (in
  frames: speaker, start, end, text)}. `codes` lines give the user's .npy; `audio` lines (stereo:
  channel 1 is the user) go through `codec` (default: the synthetic corpus's ToyCodec)."""
  out = []
  for entry in read_manifest(manifest):
    if isinstance(entry, ManifestError):
      raise entry
    if entry.kind != 'duplex':
      continue
    if entry.codes is None:
      codec = codec or ToyCodec()
      user = codec.encode(read_waves(entry, codec)['user'])
    elif 'user' in entry.codes:
      user = read_npy(entry.codes['user'])
    else:
      raise ManifestError(entry.where, 'a duplex line needs the user\'s "codes"', 'missing_field')
    if user.ndim != 2 or user.shape[0] < num_codebooks:
      raise ValueError(
        f'{entry.where}: user codes of shape {user.shape}; the checkpoint '
        f'needs [{num_codebooks}, frames]'
      )
    user = np.asarray(user[:num_codebooks], np.int32)
    segments = [dataclasses.asdict(s) for s in entry.segments]  # in seconds
    events = entry.events
    if events is None:
      events = events_from_segments(segments, user.shape[1])
    for s in segments:
      s['start'], s['end'] = seconds_to_frame(s['start']), seconds_to_frame(s['end'])
    out.append({'id': entry.id, 'user': user, 'events': list(events), 'segments': segments})
    if limit is not None and len(out) == limit:
      break
  if not out:
    raise ValueError(f'{manifest}: no duplex conversations')
  return out


def stream_steps(cfg, frames: int) -> int:
  """Decoder steps that stream `frames` user frames: frame f comes out with step f + the lag,
  `cfg.max_delay` (the decoder's offset must pass it, decode/frame.py), and one PAD step more."""
  return frames + cfg.max_delay + 1


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
  (max_len), or one that slides (overflow='slide': every frame attends to the last max_len
  frames, an attention window); it then runs `model`'s weights (StreamingDecoder.load_weights:
  a LoRA model merged, placed on the decoder's mesh) with the functions it has compiled already,
  and its own sampling (`sampling` is for a decoder built here)."""
  from tqdm import tqdm

  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig

  cfg = model.cfg
  sampling = sampling or SamplingConfig(
    greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0
  )
  batch_size = min(batch_size or len(users), len(users))
  lag = cfg.max_delay  # steps before the first output: a live listener hears frame f at f + lag
  steps = stream_steps(cfg, max(u.shape[1] for u in users))
  if decoder is None:
    decoder = StreamingDecoder(model, sampling, max_len=steps)
  else:
    if decoder.max_len < steps and decoder.overflow != 'slide':
      raise ValueError(f'stream: the decoder holds {decoder.max_len} frames; need {steps}')
    decoder.load_weights(model)  # merged if LoRA, on the decoder's mesh; nothing recompiles
  outputs = [None] * len(users)
  bar = tqdm(
    total=sum(u.shape[1] for u in users),
    desc=desc,
    unit='frame',
    disable=not progress,
    file=sys.stderr,
  )
  for first in range(0, len(users), batch_size):
    chunk = users[first : first + batch_size]
    frames = stream_steps(cfg, max(u.shape[1] for u in chunk))
    user = np.full((batch_size, cfg.num_codebooks, frames), cfg.audio_pad_id, np.int32)
    for b, u in enumerate(chunk):
      user[b, :, : u.shape[1]] = u
    state = decoder.init(batch_size)
    rows = [[] for _ in range(batch_size)]
    for t in range(frames):
      state, out, valid = decoder.step(state, user[:, :, t])
      out, valid = np.asarray(out), np.asarray(valid)
      for b in np.flatnonzero(valid):
        rows[b].append(out[b])
      bar.update(sum(t < u.shape[1] for u in chunk))
    for b, u in enumerate(chunk):
      outputs[first + b] = np.stack(rows[b][: u.shape[1]], axis=1).astype(np.int32)  # [1+C, F]
  bar.close()
  return outputs, lag
