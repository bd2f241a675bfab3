"""`flmjax chat`: an offline full-duplex session, one user frame per step.

  flmjax chat --checkpoint DIR --user CODES.npy [--out DIR] [--tokenizer PATH] [--greedy] ...

The checkpoint is an official-layout directory (config.json + safetensors) or an orbax training
run/checkpoint directory. The user's side is Mimi codes [8, frames] in a .npy, or audio encoded
with Mimi (--mimi PATH) or, without it, the synthetic corpus's toy codec. Writes
model_codes.npy [8, F], text_ids.npy [F], transcript.txt (and reply.wav, the model's speech
through the same codec, with --mimi or an audio --user), and prints the transcript as it goes.
A WAV with several channels needs --channel; channels are never averaged. Everything about the
inputs and --out is checked before decoding starts; a session that outgrows --max-len still writes
what it decoded before it fails.
"""

from __future__ import annotations

import os

import numpy as np

from flmjax.cli import ArgumentParser, command, fail
from flmjax.decode.session import IncompleteSession, check_out, load_model, run_session

OUTPUTS = ('model_codes.npy', 'text_ids.npy', 'transcript.txt', 'reply.wav')
AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg')  # read by soundfile


def _parser() -> ArgumentParser:
  ap = ArgumentParser(prog='flmjax chat', description=__doc__.split('\n\n')[0])
  ap.add_argument('--checkpoint', required=True, help='official-layout dir or orbax run dir')
  ap.add_argument(
    '--base',
    help="a LoRA run's base (the official checkpoint it trained on), where its init_from has moved",
  )
  ap.add_argument(
    '--user', required=True, help="the user's side: codes .npy [8, F] or audio (.wav, .flac, .ogg)"
  )
  ap.add_argument('--out', help='directory for model_codes.npy, text_ids.npy, transcript.txt')
  ap.add_argument(
    '--overwrite', action='store_true', help='replace the outputs of an earlier session in --out'
  )
  ap.add_argument(
    '--mimi',
    help='Mimi checkpoint (.safetensors or a dir holding one): encodes an '
    'audio --user and speaks the reply as reply.wav',
  )
  ap.add_argument(
    '--channel',
    type=int,
    default=None,
    help="the channel of a multi-channel --user WAV that holds the user's speech",
  )
  ap.add_argument(
    '--tokenizer',
    help='SentencePiece .model or tokenizer.json for the transcript '
    "(default: the one beside the checkpoint's weights, if any)",
  )
  ap.add_argument('--greedy', action='store_true', help='argmax after the repetition penalty')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument(
    '--dtype',
    choices=('float32', 'bfloat16', 'float16'),
    default=None,
    help="weights and compute dtype (default: the checkpoint's)",
  )
  ap.add_argument(
    '--max-len', type=int, default=None, help='KV-cache frames (default: the session length)'
  )
  ap.add_argument('--overflow', choices=('error', 'slide'), default='error')
  ap.add_argument(
    '--tail',
    type=int,
    default=0,
    help='extra steps with PAD user input after the user ends (max_delay returns '
    'every frame the model produced while the user spoke)',
  )
  from flmjax.decode.flags import add_sampling_flags

  add_sampling_flags(ap)
  return ap


def read_user(
  path: str, num_codebooks: int, pad_id: int, channel: int | None = None, codec=None
) -> tuple[np.ndarray, object]:
  """-> (codes int32 [C, F], codec or None). Audio goes through `codec`, by default the toy one."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--user {path}: no such file')
  ext = os.path.splitext(path)[1].lower()
  if ext not in AUDIO_EXTENSIONS + ('.npy',):
    raise ValueError(f'--user {path}: give codes as a .npy or audio as one of {AUDIO_EXTENSIONS}')
  if ext in AUDIO_EXTENSIONS:
    from flmjax.codec.toy import ToyCodec
    from flmjax.data.audio import read_audio

    codec = codec or ToyCodec()
    (wave,) = read_audio(path, channel=channel, target_rate=codec.sample_rate)  # [S]
    if wave.shape[0] < codec.frame_size:
      raise ValueError(
        f'--user {path}: {wave.shape[0]} samples at {codec.sample_rate} Hz, shorter '
        f'than one {1000 * codec.frame_size // codec.sample_rate} ms frame'
      )
    return np.asarray(codec.encode(wave), np.int32), codec
  if channel is not None:
    raise ValueError(f'--channel applies to an audio --user, not {path}')
  from flmjax.data.manifest import read_npy

  codes = read_npy(path)
  if codes.ndim == 3 and codes.shape[0] == 1:
    codes = codes[0]
  if codes.ndim == 2 and codes.shape[1] == num_codebooks and codes.shape[0] != num_codebooks:
    raise ValueError(
      f'--user {path}: codes of shape {codes.shape} look transposed; save them as '
      f'[{num_codebooks}, frames] (codes.T)'
    )
  if codes.ndim != 2 or codes.shape[0] != num_codebooks:
    raise ValueError(
      f'--user {path}: expected codes of shape [{num_codebooks}, frames], got {codes.shape}'
    )
  if codes.shape[1] == 0:
    raise ValueError(f'--user {path}: the codes hold 0 frames (shape {codes.shape})')
  if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() > pad_id:
    raise ValueError(
      f'--user {path}: codes must be integers in 0..{pad_id} (PAD), got dtype '
      f'{codes.dtype}, range {codes.min()}..{codes.max()}'
    )
  return codes.astype(np.int32), codec


def write_outputs(out_dir: str, out: np.ndarray, transcript: str, codec) -> str:
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, 'model_codes.npy'), out[1:])
  np.save(os.path.join(out_dir, 'text_ids.npy'), out[0])
  with open(os.path.join(out_dir, 'transcript.txt'), 'w') as f:
    f.write(transcript + '\n')
  if codec is not None and out.shape[1]:
    import soundfile

    path = os.path.join(out_dir, 'reply.wav')
    soundfile.write(path + '.tmp', codec.decode(out[1:]), codec.sample_rate, format='WAV')
    os.replace(path + '.tmp', path)
  return (
    f'{out_dir}/model_codes.npy [{out.shape[0] - 1}, {out.shape[1]}], text_ids.npy, '
    'transcript.txt' + (', reply.wav' if codec is not None and out.shape[1] else '')
  )


@command('flmjax chat')
def main(argv: list[str]) -> int:
  ap = _parser()
  args = ap.parse_args(argv)
  for flag, value, low in (
    ('--tail', args.tail, 0),
    ('--max-len', args.max_len, 1),
    ('--channel', args.channel, 0),
  ):
    if value is not None and value < low:
      ap.error(f'{flag} {value} must be >= {low}')
  from flmjax.decode.flags import sampling_from_flags

  try:
    sampling = sampling_from_flags(args)
  except ValueError as e:
    ap.error(str(e))
  if args.out is not None:
    check_out(args.out, args.overwrite, OUTPUTS)
  model = load_model(args.checkpoint, args.dtype, base=args.base)
  cfg = model.cfg
  codec = None
  if args.mimi:
    from flmjax.codec import load_mimi
    from flmjax.codec.mimi_codec import MimiCodec

    codec = MimiCodec(load_mimi(args.mimi, num_codebooks=cfg.num_codebooks))
  user, codec = read_user(args.user, cfg.num_codebooks, cfg.audio_pad_id, args.channel, codec)
  tokenizer = None
  beside = [
    os.path.join(args.checkpoint, n)
    for n in ('tokenizer.json', 'tokenizer.model')
    if os.path.isfile(os.path.join(args.checkpoint, n))
  ]  # as `flmjax export` writes it
  if args.tokenizer or beside:
    from flmjax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or beside[0])
  try:
    out, transcript = run_session(
      model,
      user,
      sampling,
      seed=args.seed,
      max_len=args.max_len,
      overflow=args.overflow,
      tail=args.tail,
      tokenizer=tokenizer,
    )
  except IncompleteSession as e:
    kept = (
      f'wrote the {e.out.shape[1]} model frames decoded so far to '
      f'{write_outputs(args.out, e.out, e.transcript, codec)}'
      if args.out
      else 'the transcript so far is above'
    )
    return fail('flmjax chat', f'{e}; {kept}')
  if args.out:
    print(f'wrote {write_outputs(args.out, out, transcript, codec)}')
  return 0
