"""Full-Duplex-Bench's convention: for every `input.wav` under a folder, the model's side of the
conversation as a time-aligned `output.wav` (24 kHz mono, the input's duration) under the same
relative path of another folder, so that the public benchmark can score it.

Time alignment is a live session's: the user's audio streams in one 80 ms frame a step, and output
frame f is what the model plays while input frame f plays. Its first `max_delay` frames (the
steps before the decoder's first output) are silence, as they are live.
"""

from __future__ import annotations

import os

import numpy as np

INPUT_NAME, OUTPUT_NAME = 'input.wav', 'output.wav'


def find_inputs(in_dir: str) -> list[str]:
  """The relative paths of every input.wav under in_dir, sorted."""
  if not os.path.isdir(in_dir):
    raise FileNotFoundError(f'--in {in_dir}: no such directory')
  found = sorted(
    os.path.relpath(os.path.join(root, name), in_dir)
    for root, _, names in os.walk(in_dir)
    for name in names
    if name == INPUT_NAME
  )
  if not found:
    raise ValueError(
      f'--in {in_dir}: no {INPUT_NAME} under it (Full-Duplex-Bench keeps one per sample folder)'
    )
  return found


def read_input(path: str, sample_rate: int) -> np.ndarray:
  """A mono WAV -> float32 [S] at sample_rate (soxr resamples any other rate)."""
  import soundfile
  import soxr

  try:
    wave, rate = soundfile.read(path, dtype='float32', always_2d=True)  # [S, C]
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    raise ValueError(f'{path}: not a readable WAV file: {e}') from None
  if wave.shape[1] != 1:
    raise ValueError(
      f'{path}: {wave.shape[1]} channels; Full-Duplex-Bench inputs are mono (the '
      'user alone); channels are never averaged'
    )
  if wave.shape[0] == 0 or not np.isfinite(wave).all():
    raise ValueError(f'{path}: the audio is empty or holds NaN/inf samples')
  wave = wave[:, 0]
  if rate != sample_rate:
    wave = soxr.resample(wave, rate, sample_rate).astype(np.float32)
  return wave


def check_out(out_dir: str, overwrite: bool) -> None:
  """--out must not hold anything yet unless --overwrite (then only output.wav files are
  replaced, one by one, each written to a temporary file first)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir} is a file; give a directory')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(
      f'--out {out_dir} already exists and is not empty; pass --overwrite to '
      f'replace its {OUTPUT_NAME} files, or choose another directory'
    )


def respond(
  model,
  codec,
  waves: list[np.ndarray],
  *,
  batch_size: int | None = None,
  sampling=None,
  progress: bool = False,
) -> list[np.ndarray]:
  """Users' waves [S_i] at the codec's rate -> the model's time-aligned replies [S_i]."""
  from flmjax.eval.activity import playable
  from flmjax.eval.stream import stream

  F = codec.frame_size
  padded = [np.pad(w, (0, -len(w) % F)) for w in waves]  # whole frames: every sample is heard
  users = [np.asarray(c[: model.cfg.num_codebooks], np.int32) for c in codec.encode_batch(padded)]
  outputs, lag = stream(
    model, users, sampling=sampling, batch_size=batch_size, progress=progress, desc='eval fdb'
  )
  replies = []
  for wave, out in zip(waves, outputs):
    frames = out.shape[1]
    heard = codec.decode(playable(out[1:, : frames - lag])) if frames > lag else np.zeros(0)
    reply = np.zeros(len(wave), np.float32)
    live = np.concatenate([np.zeros(lag * F, np.float32), np.asarray(heard, np.float32)])
    reply[: min(len(wave), len(live))] = live[: len(wave)]
    replies.append(reply)
  return replies


def run_fdb(
  model,
  codec,
  in_dir: str,
  out_dir: str,
  *,
  overwrite: bool = False,
  batch_size: int | None = None,
  sampling=None,
  progress: bool = False,
) -> list[str]:
  """Every input.wav under in_dir -> output.wav under out_dir; returns the paths written. All
  inputs and --out are checked before decoding starts."""
  import soundfile

  check_out(out_dir, overwrite)
  names = find_inputs(in_dir)
  waves = [read_input(os.path.join(in_dir, n), codec.sample_rate) for n in names]
  replies = respond(
    model, codec, waves, batch_size=batch_size, sampling=sampling, progress=progress
  )
  written = []
  for name, reply in zip(names, replies):
    path = os.path.join(out_dir, os.path.dirname(name), OUTPUT_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(
      path + '.tmp', np.clip(reply, -1, 1), codec.sample_rate, format='WAV', subtype='PCM_16'
    )
    os.replace(path + '.tmp', path)
    written.append(path)
  return written
