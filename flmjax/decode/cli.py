"""`flmjax chat`: an offline full-duplex session, one user frame per step.

  flmjax chat --checkpoint DIR --user CODES.npy [--out DIR] [--tokenizer PATH] [--greedy] ...

The checkpoint is an official-layout directory (config.json + safetensors) or an orbax training
run/checkpoint directory. The user's side is Mimi-style codes [8, frames] in a .npy, or a WAV
encoded with the toy codec of the synthetic corpus (`flmjax.codec.toy.ToyCodec`; chat does
not use Mimi yet). Writes model_codes.npy [8, F], text_ids.npy [F], transcript.txt (and
model.wav through the same codec when the input was a WAV), and prints the transcript as it goes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='flmjax chat', description=__doc__.split('\n\n')[0])
  ap.add_argument('--checkpoint', required=True, help='official-layout dir or orbax run dir')
  ap.add_argument('--user', required=True, help="the user's side: codes .npy [8, F] or a .wav")
  ap.add_argument('--out', help='directory for model_codes.npy, text_ids.npy, transcript.txt')
  ap.add_argument('--tokenizer', help='SentencePiece .model or tokenizer.json for the transcript')
  ap.add_argument('--greedy', action='store_true', help='argmax after the repetition penalty')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default=None,
                  help="weights and compute dtype (default: the checkpoint's)")
  ap.add_argument('--max-len', type=int, default=None,
                  help='KV-cache frames (default: the session length)')
  ap.add_argument('--overflow', choices=('error', 'slide'), default='error')
  ap.add_argument('--tail', type=int, default=0,
                  help='extra steps with PAD user input after the user ends (max_delay returns '
                       'every frame the model produced while the user spoke)')
  from flmjax.decode.sampling import SamplingConfig
  for field in ('temp', 'top_k', 'top_p', 'repetition_penalty'):
    for kind in ('text', 'audio'):
      name = f'{field}_{kind}'
      default = getattr(SamplingConfig, name)
      ap.add_argument('--' + name.replace('_', '-'), type=type(default), default=default)
  return ap


def load_model(path: str, dtype: str | None = None):
  """An official-layout dir through load_official (in `dtype`, default the checkpoint's), else an
  orbax training checkpoint."""
  import flmjax
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--checkpoint {path}: no such directory')
  if os.path.exists(os.path.join(path, 'config.json')):
    return flmjax.load_official(path, dtype=dtype)
  try:
    from flmjax.train.export import restore_model
  except ImportError as e:
    raise FileNotFoundError(f'--checkpoint {path}: no config.json, and no training checkpoint '
                            f'reader is installed ({e})') from None
  return restore_model(path)[0]


def read_user(path: str, num_codebooks: int, pad_id: int) -> tuple[np.ndarray, object]:
  """-> (codes int32 [C, F], codec or None)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--user {path}: no such file')
  if path.endswith('.wav'):
    import soundfile
    import soxr
    from flmjax.codec.toy import ToyCodec
    codec = ToyCodec()
    wave, rate = soundfile.read(path, dtype='float32', always_2d=True)
    wave = wave.mean(axis=1)
    if rate != codec.sample_rate:
      wave = soxr.resample(wave, rate, codec.sample_rate)
    return np.asarray(codec.encode(wave), np.int32), codec
  codes = np.load(path)
  if codes.ndim == 3 and codes.shape[0] == 1:
    codes = codes[0]
  if codes.ndim != 2 or codes.shape[0] != num_codebooks:
    raise ValueError(f'--user {path}: expected codes of shape [{num_codebooks}, frames], '
                     f'got {codes.shape}')
  if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() > pad_id:
    raise ValueError(f'--user {path}: codes must be integers in 0..{pad_id} (PAD), got dtype '
                     f'{codes.dtype}, range {codes.min()}..{codes.max()}')
  return codes.astype(np.int32), None


class Transcript:
  """Prints the monologue as it streams: WAITs and specials skipped, text decoded incrementally."""

  def __init__(self, cfg, tokenizer=None, stream=None):
    self.cfg, self.tokenizer, self.stream = cfg, tokenizer, stream or sys.stdout
    self.ids: list[int] = []
    self.shown = ''

  def add(self, token: int) -> None:
    specials = (self.cfg.text_wait_id, self.cfg.text_bos_id, self.cfg.text_eos_id)
    if token in specials:
      return
    self.ids.append(token)
    text = self.text()
    self.stream.write(text[len(self.shown):] if text.startswith(self.shown) else '\n' + text)
    self.stream.flush()
    self.shown = text

  def text(self) -> str:
    if self.tokenizer is None:
      return ''.join(f'<{i}>' for i in self.ids)
    vocab = self.tokenizer.vocab_size
    known = [i for i in self.ids if i < vocab]  # ids past the tokenizer are model-only specials
    return self.tokenizer.decode(known)


def run_session(model, user: np.ndarray, sampling, *, seed: int = 0, max_len: int | None = None,
                overflow: str = 'error', tail: int = 0, tokenizer=None,
                stream=None) -> tuple[np.ndarray, str]:
  """One offline session: user codes [C, F] (+ `tail` PAD frames) -> (model frames [1+C, F'] =
  [text; speak codes], the transcript). Prints the transcript to `stream` as it goes."""
  from flmjax.decode import StreamingDecoder
  cfg = model.cfg
  frames = user.shape[1] + tail
  dec = StreamingDecoder(model, sampling, max_len=max_len or max(frames, 1), overflow=overflow)
  state = dec.init(1, seed=seed)
  pad = np.full((cfg.num_codebooks,), cfg.audio_pad_id, np.int32)
  transcript = Transcript(cfg, tokenizer, stream)
  outputs, start = [], time.perf_counter()
  for t in range(frames):
    frame = user[:, t] if t < user.shape[1] else pad
    state, out, valid = dec.step(state, frame[None])
    if bool(valid[0]):
      row = np.asarray(out)[0]
      outputs.append(row)
      transcript.add(int(row[0]))
  elapsed = time.perf_counter() - start
  out = np.stack(outputs, axis=1) if outputs else np.zeros((1 + cfg.num_codebooks, 0), np.int32)
  transcript.stream.write(f'\n[{frames} frames in {elapsed:.2f} s '
                          f'({1000 * elapsed / max(frames, 1):.1f} ms/frame incl. compile); '
                          f'{out.shape[1]} model frames]\n')
  return out, transcript.text()


def main(argv: list[str]) -> int:
  ap = _parser()
  args = ap.parse_args(argv)
  from flmjax.decode import SamplingConfig
  try:
    model = load_model(args.checkpoint, args.dtype)
    cfg = model.cfg
    user, codec = read_user(args.user, cfg.num_codebooks, cfg.audio_pad_id)
    tokenizer = None
    if args.tokenizer:
      from flmjax.data.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(args.tokenizer)
    sampling = SamplingConfig(greedy=args.greedy, **{
        f'{f}_{k}': getattr(args, f'{f}_{k}') for f in ('temp', 'top_k', 'top_p',
                                                          'repetition_penalty')
        for k in ('text', 'audio')})
  except (OSError, ValueError) as e:
    ap.error(str(e))
  out, transcript = run_session(model, user, sampling, seed=args.seed, max_len=args.max_len,
                                overflow=args.overflow, tail=args.tail, tokenizer=tokenizer)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, 'model_codes.npy'), out[1:])
    np.save(os.path.join(args.out, 'text_ids.npy'), out[0])
    with open(os.path.join(args.out, 'transcript.txt'), 'w') as f:
      f.write(transcript + '\n')
    if codec is not None:
      import soundfile
      soundfile.write(os.path.join(args.out, 'model.wav'), codec.decode(out[1:]), codec.sample_rate)
    print(f'wrote {args.out}/model_codes.npy [{cfg.num_codebooks}, {out.shape[1]}], '
          f'text_ids.npy, transcript.txt' + (', model.wav' if codec is not None else ''))
  return 0
