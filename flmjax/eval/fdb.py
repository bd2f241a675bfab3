"""Full-Duplex-Bench's convention: for every `input.wav` under a folder, the model's side of the
conversation as a time-aligned `output.wav` (24 kHz mono, the input's duration) and its words as
`output.json` under the same relative path of another folder (or the same folder: in place, FDB's
own layout), so that the public benchmark can score it; `score` scores them by FDB's rules.

Time alignment is a live session's: the user's audio streams in one 80 ms frame a step, and output
frame f is what the model plays while input frame f plays. Its first `max_delay` frames (the
steps before the decoder's first output) are silence, as they are live.
"""

from __future__ import annotations

import json
import os

import numpy as np

from flmjax.data.audio import read_audio
from flmjax.outputs import check_out_dir

INPUT_NAME, OUTPUT_NAME, WORDS_NAME = 'input.wav', 'output.wav', 'output.json'


def find_inputs(in_dir: str) -> list[str]:
  """The relative paths of every input.wav under in_dir, sorted."""
  if not os.path.isdir(in_dir):
    raise FileNotFoundError(f'`in_dir` {in_dir}: no such directory')
  found = sorted(
    os.path.relpath(os.path.join(root, name), in_dir)
    for root, _, names in os.walk(in_dir)
    for name in names
    if name == INPUT_NAME
  )
  if not found:
    raise ValueError(
      f'`in_dir` {in_dir}: no {INPUT_NAME} under it (Full-Duplex-Bench keeps one per sample folder)'
    )
  return found


def read_input(path: str, sample_rate: int) -> np.ndarray:
  """A mono WAV -> float32 [S] at sample_rate (soxr resamples any other rate)."""
  mono = 'Full-Duplex-Bench inputs are mono (the user alone); channels are never averaged'
  return read_audio(path, target_rate=sample_rate, mono_fix=mono)[0]


def check_out(out_dir: str, overwrite: bool, in_dir: str | None = None) -> None:
  """`out` must not hold anything yet unless `overwrite` (then only output.wav and output.json
  files are replaced, one by one, each written to a temporary file first). `out` equal to `in_dir`
  writes in place, beside every input.wav: allowed when none of them has an output.wav or
  output.json yet, or with `overwrite`."""
  if in_dir is not None and os.path.isdir(out_dir) and os.path.samefile(in_dir, out_dir):
    taken = [n for n in find_inputs(in_dir) if _has_outputs(os.path.join(in_dir, n))]
    if taken and not overwrite:
      raise FileExistsError(
        f'`out` {out_dir} (in place) already holds {OUTPUT_NAME}/{WORDS_NAME} beside '
        f'{taken[0]}; pass `overwrite` to replace them'
      )
    return
  check_out_dir(out_dir, overwrite, replaced=f'its {OUTPUT_NAME} and {WORDS_NAME} files')


def _has_outputs(input_path: str) -> bool:
  folder = os.path.dirname(input_path)
  return any(os.path.exists(os.path.join(folder, n)) for n in (OUTPUT_NAME, WORDS_NAME))


def respond(
  model,
  codec,
  waves: list[np.ndarray],
  *,
  batch_size: int | None = None,
  sampling=None,
  progress: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
  """Users' waves [S_i] at the codec's rate -> (the model's time-aligned replies [S_i], its
  un-delayed frames [1 + C, F_i] (text; speak codes), the decoder's lag in frames)."""
  from flmjax.codec.base import playable
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
  return replies, outputs, lag


def run_fdb(
  model,
  codec,
  in_dir: str,
  out_dir: str,
  *,
  tokenizer=None,
  lead_frames: int = 2,
  overwrite: bool = False,
  batch_size: int | None = None,
  sampling=None,
  progress: bool = False,
) -> list[str]:
  """Every input.wav under in_dir -> output.wav, and with a tokenizer output.json (the model's
  words from its text stream, flmjax.eval.words, at the times output.wav plays them), under
  out_dir; returns the paths written. All inputs and out_dir are checked before decoding starts."""
  import soundfile

  from flmjax.codec.toy import ToyCodec
  from flmjax.eval.activity import speech_activity
  from flmjax.eval.words import output_json, words_from_text

  check_out(out_dir, overwrite, in_dir)
  names = find_inputs(in_dir)
  waves = [read_input(os.path.join(in_dir, n), codec.sample_rate) for n in names]
  replies, outputs, lag = respond(
    model, codec, waves, batch_size=batch_size, sampling=sampling, progress=progress
  )
  written = []
  for name, reply, out in zip(names, replies, outputs):
    path = os.path.join(out_dir, os.path.dirname(name), OUTPUT_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(
      path + '.tmp', np.clip(reply, -1, 1), codec.sample_rate, format='WAV', subtype='PCM_16'
    )
    os.replace(path + '.tmp', path)
    written.append(path)
    if tokenizer is None:
      continue
    if isinstance(codec, ToyCodec):
      active = speech_activity(out[1:])
    else:  # the energy of what output.wav plays, frame by frame from the decoder's first output
      live = reply[lag * codec.frame_size :]
      active = speech_activity(wave=live)[: out.shape[1]]
    words = words_from_text(out[0], active, tokenizer, model.cfg, lead_frames)
    doc = output_json(words, codec.frame_rate, shift_frames=lag)
    doc['duration_s'] = round(len(reply) / codec.sample_rate, 4)
    words_path = os.path.join(os.path.dirname(path), WORDS_NAME)
    with open(words_path + '.tmp', 'w') as f:
      json.dump(doc, f, indent=1)
    os.replace(words_path + '.tmp', words_path)
    written.append(words_path)
  return written


def _fdb_reply(chunks: list[dict]) -> tuple[bool, float | None]:
  """FDB's rule on one output.json's chunks -> (takeover, the first word's start in s)."""
  from flmjax.eval.turn_taking import FDB_MAX_SHORT_WORDS, FDB_MIN_SECONDS

  if not chunks:
    return False, None
  first, last = chunks[0]['timestamp'], chunks[-1]['timestamp']
  end = last[-1] if last[-1] is not None else last[0]  # as FDB's pause script reads a missing end
  short = end - first[0] < FDB_MIN_SECONDS and len(chunks) <= FDB_MAX_SHORT_WORDS
  return not short, first[0]


def score(in_dir: str, out_dir: str, transcripts: str | None = None) -> dict:
  """Full-Duplex-Bench's smooth turn-taking and pause handling scores, by its rules
  (v1_v1.5/evaluation/eval_smooth_turn_taking.py, eval_pause_handling.py): every sample folder
  under in_dir with a turn_taking.json (the user's turn end: its first timestamp) or a pause.json
  is scored from the output.json at its relative path under `transcripts` (an external ASR's
  files) or else under out_dir (the model's own words). A rate or mean over no samples is None.
  """
  takeovers, latencies, pauses = [], [], []
  for name in find_inputs(in_dir):
    folder = os.path.dirname(name)
    task = [
      t
      for t in ('turn_taking', 'pause')
      if os.path.isfile(os.path.join(in_dir, folder, t + '.json'))
    ]
    if not task:
      continue
    words = os.path.join(transcripts or out_dir, folder, WORDS_NAME)
    if not os.path.isfile(words):
      raise FileNotFoundError(
        f'{words}: no {WORDS_NAME} for {name} (run eval fdb, or give `transcripts`)'
      )
    with open(words) as f:
      took, first = _fdb_reply(json.load(f)['chunks'])
    if task[0] == 'pause':
      pauses.append(took)
      continue
    with open(os.path.join(in_dir, folder, 'turn_taking.json')) as f:
      turn_end = json.load(f)[0]['timestamp'][0]
    takeovers.append(took)
    if took:
      latencies.append(max(0.0, first - turn_end))  # FDB counts an early start as 0
  mean = lambda v: sum(v) / len(v) if v else None
  return {
    'rules': 'fdb',
    'source': 'external ASR: ' + transcripts if transcripts else 'the model text stream',
    'takeover_rate': mean(takeovers),
    'response_latency_s_mean': mean(latencies),
    'pause_takeover_rate': mean(pauses),
    'counts': {'turn_taking': len(takeovers), 'pause': len(pauses)},
  }
