"""`flmjax data ...`: prepare a manifest into ArrayRecord shards, or write the synthetic corpus."""

from __future__ import annotations

import os

from flmjax.cli import ArgumentParser, command, fail, spell

# the library's argument names (flmjax.cli.spell) -> the flags of `prepare` and `synth`
PREPARE_FLAGS = {
  'out': 'OUT_DIR',
  'overwrite': '--overwrite',
  'codec': '--codec mimi --mimi PATH',
  'manifest': 'MANIFEST',
}
SYNTH_FLAGS = {'out': 'OUT'}


def _parser() -> ArgumentParser:
  p = ArgumentParser(prog='flmjax data')
  sub = p.add_subparsers(dest='command', required=True)
  prep = sub.add_parser('prepare', help='manifest (JSONL) -> ArrayRecord shards + summary.json')
  prep.add_argument('manifest')
  prep.add_argument('out_dir')
  prep.add_argument('--tokenizer', required=True, help='SentencePiece .model or tokenizer.json')
  prep.add_argument(
    '--codec',
    choices=('none', 'toy', 'mimi'),
    default='none',
    help='codec for "audio" lines: "mimi" (needs --mimi), or "toy" for the '
    "synthetic corpus's ToyCodec audio",
  )
  prep.add_argument('--mimi', help='Mimi checkpoint (.safetensors, or a dir holding one)')
  prep.add_argument(
    '--audio-batch',
    type=int,
    default=64,
    help='audio lines read and encoded together (batched over the devices)',
  )
  prep.add_argument('--strict', action='store_true', help='stop at the first bad line')
  prep.add_argument(
    '--overwrite',
    action='store_true',
    help='replace OUT_DIR when it holds a dataset prepared before',
  )
  prep.add_argument('--records-per-shard', type=int, default=4096)
  prep.add_argument('--no-progress', action='store_true')
  syn = sub.add_parser('synth', help='write the embedded synthetic corpus (manifests + codes)')
  syn.add_argument('out_dir')
  syn.add_argument('--seed', type=int, default=0)
  syn.add_argument('--num-tts-asr', type=int, default=400)
  syn.add_argument('--num-duplex', type=int, default=400)
  syn.add_argument('--num-heldout', type=int, default=64)
  syn.add_argument('--audio', action='store_true', help='write ToyCodec wav files, not .npy codes')
  return p


def make_codec(name: str, mimi_path: str | None):
  """The codec for "audio" lines: None, ToyCodec, or Mimi batched over all devices."""
  if name == 'toy':
    from flmjax.codec.toy import ToyCodec

    return ToyCodec()
  if name == 'mimi':
    from flmjax.codec.mimi_codec import load_mimi_codec

    return load_mimi_codec(mimi_path)
  return None


@command('flmjax data')
def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.command == 'synth':
    from flmjax.data import synthetic

    for flag in ('num_tts_asr', 'num_duplex', 'num_heldout'):
      if getattr(args, flag) < 1:
        return fail(
          'flmjax data synth', f'--{flag.replace("_", "-")} {getattr(args, flag)} must be >= 1'
        )
    from flmjax.outputs import check_out_dir

    try:  # only an earlier corpus is rewritten
      check_out_dir(args.out_dir, True, marker='tokenizer.model', ours='a synthetic corpus')
    except OSError as e:
      return fail('flmjax data synth', spell(str(e), SYNTH_FLAGS))
    paths = synthetic.generate(
      args.out_dir,
      seed=args.seed,
      num_tts_asr=args.num_tts_asr,
      num_duplex=args.num_duplex,
      num_heldout=args.num_heldout,
      write_audio=args.audio,
    )
    for name, path in paths.items():
      print(f'{name}: {path}')
    return 0
  from flmjax.data.prepare import format_summary, prepare
  from flmjax.data.records import SUMMARY
  from flmjax.data.tokenizer import load_tokenizer
  from flmjax.outputs import check_out_dir

  if args.records_per_shard < 1:
    return fail('flmjax data prepare', f'--records-per-shard {args.records_per_shard} must be >= 1')
  if args.audio_batch < 1:
    return fail('flmjax data prepare', f'--audio-batch {args.audio_batch} must be >= 1')
  if (args.codec == 'mimi') != (args.mimi is not None):
    return fail('flmjax data prepare', '--codec mimi and --mimi PATH go together')
  try:
    check_out_dir(  # before the tokenizer loads
      os.path.abspath(args.out_dir), args.overwrite, marker=SUMMARY, ours='a prepared dataset'
    )
    summary = prepare(
      args.manifest,
      args.out_dir,
      load_tokenizer(args.tokenizer),
      codec=make_codec(args.codec, args.mimi),
      strict=args.strict,
      records_per_shard=args.records_per_shard,
      progress=not args.no_progress,
      overwrite=args.overwrite,
      audio_batch=args.audio_batch,
    )
  except (OSError, ValueError) as e:  # ManifestError is a ValueError
    return fail('flmjax data prepare', spell(str(e), PREPARE_FLAGS))
  print(spell(format_summary(summary), PREPARE_FLAGS))
  return 0
