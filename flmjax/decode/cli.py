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

from flmjax.cli import ArgumentParser, command, fail, spell
from flmjax.decode.files import OUTPUTS, read_user, write_outputs
from flmjax.decode.session import IncompleteSession, load_model, run_session
from flmjax.outputs import check_out_dir

# the library's argument names in its errors (flmjax.cli.spell) -> this command's flags
FLAGS = {
  name: '--' + name.replace('_', '-')
  for name in ('checkpoint', 'base', 'user', 'out', 'overwrite', 'channel', 'max_len', 'overflow')
}


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


@command('flmjax chat', FLAGS)
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
    check_out_dir(args.out, args.overwrite, OUTPUTS)
  model = load_model(args.checkpoint, args.dtype, base=args.base)
  cfg = model.cfg
  codec = None
  if args.mimi:
    from flmjax.codec.mimi_codec import load_mimi_codec

    codec = load_mimi_codec(args.mimi, cfg.num_codebooks)
  user, codec = read_user(args.user, cfg.num_codebooks, cfg.audio_pad_id, args.channel, codec)
  from flmjax.data.tokenizer import resolve_tokenizer

  tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint)
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
    return fail('flmjax chat', spell(f'{e}; {kept}', FLAGS))
  if args.out:
    print(f'wrote {write_outputs(args.out, out, transcript, codec)}')
  return 0
