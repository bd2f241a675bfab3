"""`flmjax eval duplex|fdb`: measure a checkpoint as a full-duplex talker.

  flmjax eval duplex --checkpoint DIR --data HELDOUT.jsonl [--mimi PATH] [--out REPORT_DIR]
                     [--rules flmjax|fdb] [--kv-pages N [--page-size P] [--kv-dtype int8]]
  flmjax eval fdb --checkpoint DIR --in DIR --out DIR [--mimi PATH] [--overwrite]
                  [--rules fdb] [--transcripts DIR]

`duplex` streams held-out conversations through the decoder and writes report.json, report.md
(turn-taking beside exact answers and teacher-forced accuracies) and timelines/<id>.png.
`fdb` writes Full-Duplex-Bench outputs: output.wav and output.json (the model's words) for every
input.wav, under --out or in place (--out equal to --in); --rules fdb then scores them by FDB's
rules (docs/evaluation.md).
"""

from __future__ import annotations

import os
import tempfile

from flmjax.cli import ArgumentParser, command

REPORT_FILES = ('report.json', 'report.md', 'timelines')
# the library's argument names in its errors (flmjax.cli.spell) -> this command's flags
FLAGS = {
  'checkpoint': '--checkpoint',
  'in_dir': '--in',
  'out': '--out',
  'overwrite': '--overwrite',
  'transcripts': '--transcripts',
  'codec': '--mimi PATH',
}


def _parser() -> ArgumentParser:
  from flmjax.decode.flags import add_kv_flags

  ap = ArgumentParser(prog='flmjax eval', description=__doc__.split('\n\n')[0])
  sub = ap.add_subparsers(dest='command', required=True)
  d = sub.add_parser('duplex', help='held-out conversations: turn-taking and content accuracy')
  d.add_argument('--checkpoint', required=True, help='official-layout dir or orbax run dir')
  d.add_argument('--data', required=True, help='held-out duplex manifest (JSONL)')
  d.add_argument(
    '--asr-tts',
    help='held-out single-speaker manifest for the teacher-forced ASR '
    'and TTS accuracies (default: heldout_tts_asr.jsonl beside '
    '--data, if there)',
  )
  d.add_argument(
    '--tokenizer', help='default: tokenizer.model/.json beside --data, else beside the checkpoint'
  )
  d.add_argument(
    '--mimi',
    help='Mimi checkpoint: encodes audio lines, and speech activity comes '
    'from the decoded audio energy (else: the toy speech codes)',
  )
  d.add_argument('--out', default=os.path.join('reports', 'duplex'), help='report directory')
  d.add_argument('--overwrite', action='store_true', help='replace an earlier report in --out')
  d.add_argument('--limit', type=int, default=None, help='evaluate the first N conversations')
  d.add_argument('--batch-size', type=int, default=None, help='conversations streamed at once')
  d.add_argument('--lead-frames', type=int, default=2, help='TTS-style monologue lead')
  d.add_argument('--trail-frames', type=int, default=0, help='ASR-style monologue trail')
  d.add_argument('--eval-batches', type=int, default=4, help='teacher-forced batches of 8')
  d.add_argument('--no-progress', action='store_true')
  d.add_argument(
    '--vad',
    choices=('energy', 'silero'),
    default='energy',
    help='with --mimi: speech activity from the audio energy or Silero VAD (the vad extra)',
  )
  d.add_argument(
    '--rules',
    choices=('flmjax', 'fdb'),
    default='flmjax',
    help="fdb: Full-Duplex-Bench's takeover rule (a reply under 1 s of 3 words or fewer is none)",
  )
  add_kv_flags(d, 'stream through a paged KV cache of N pages per layer (default: contiguous)')
  d.add_argument(
    '--attention-window',
    type=int,
    default=None,
    metavar='N',
    help='each frame attends to the last N frames only (a ring cache of N positions); a model '
    'trained on N-frame windows has seen no longer context (default: the whole conversation)',
  )
  f = sub.add_parser('fdb', help='Full-Duplex-Bench: output.wav/.json beside every input.wav')
  f.add_argument('--checkpoint', required=True)
  f.add_argument(
    '--mimi', help='Mimi checkpoint (.safetensors or its dir); default: the toy codec (tests)'
  )
  f.add_argument('--in', dest='in_dir', required=True, help='folder with */input.wav')
  f.add_argument(
    '--out', required=True, help='folder for */output.wav (same relative paths); --in: in place'
  )
  f.add_argument('--overwrite', action='store_true', help='replace output.wav/.json files')
  f.add_argument('--tokenizer', help='for output.json; default: beside the checkpoint')
  f.add_argument('--lead-frames', type=int, default=2, help="the model's text lead over speech")
  f.add_argument(
    '--rules', choices=('fdb',), help="score turn_taking.json/pause.json samples by FDB's rules"
  )
  f.add_argument(
    '--transcripts', help="an external ASR's */output.json to score instead of the model's words"
  )
  f.add_argument('--batch-size', type=int, default=None)
  f.add_argument('--no-progress', action='store_true')
  return ap


def _teacher_forced(model, args, tokenizer, codec) -> dict:
  """Prepares the held-out manifests in a temporary folder and evaluates them teacher-forced."""
  from flmjax.data.pipeline import SourceSpec
  from flmjax.data.prepare import prepare
  from flmjax.eval.teacher_forced import teacher_forced

  asr_tts = args.asr_tts or os.path.join(
    os.path.dirname(os.path.abspath(args.data)), 'heldout_tts_asr.jsonl'
  )
  with tempfile.TemporaryDirectory() as tmp:
    prep = lambda manifest, name: (
      prepare(
        manifest, os.path.join(tmp, name), tokenizer, codec=codec, strict=True, progress=False
      ),
      os.path.join(tmp, name),
    )[1]
    sets = {'duplex': (SourceSpec(prep(args.data, 'duplex'), offset_frames=args.lead_frames),)}
    if os.path.isfile(asr_tts):
      single = prep(asr_tts, 'single')
      sets['ASR (listen, trail)'] = (
        SourceSpec(single, layout='trail', speech_stream='listen', offset_frames=args.trail_frames),
      )
      sets['TTS (speak, lead)'] = (
        SourceSpec(single, layout='lead', offset_frames=args.lead_frames),
      )
    return teacher_forced(model, sets, num_batches=args.eval_batches)


def _check_paged(args) -> None:
  from flmjax.decode.flags import check_kv_dtype

  for flag, value in (('--kv-pages', args.kv_pages), ('--page-size', args.page_size)):
    if value is not None and value < 1:
      raise ValueError(f'{flag} {value} must be >= 1')
  check_kv_dtype(args)


def _check_window(args) -> None:
  if args.attention_window is None:
    return
  if args.attention_window < 1:
    raise ValueError(f'--attention-window {args.attention_window} must be >= 1')
  if args.kv_pages is not None:
    raise ValueError('--attention-window takes the contiguous cache; drop --kv-pages')


def _window_decoder(args, model):
  """With --attention-window N: a greedy decoder whose cache is a ring of N positions
  (overflow='slide'), so each frame attends to the last N frames; None without."""
  if args.attention_window is None:
    return None
  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig

  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  return StreamingDecoder(model, greedy, max_len=args.attention_window, overflow='slide')


def _paged_decoder(args, model, conversations):
  """With --kv-pages: a greedy decoder over a paged pool, max_len the longest conversation (and
  its tail) rounded up to whole pages; None without. A pool smaller than the sessions streamed
  at once need is refused here, before any streaming, so no conversation runs on a slid cache."""
  if args.kv_pages is None:
    return None
  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig
  from flmjax.eval.stream import stream_steps

  steps = lambda chunk: stream_steps(model.cfg, max(c['user'].shape[1] for c in chunk))
  batch = min(args.batch_size or len(conversations), len(conversations))
  size = args.page_size
  pages = lambda chunk: len(chunk) * -(-steps(chunk) // size)
  need = max(pages(conversations[i : i + batch]) for i in range(0, len(conversations), batch))
  if need > args.kv_pages:
    raise ValueError(
      f'--kv-pages {args.kv_pages}: {batch} conversations streamed at once need {need} pages of '
      f'{size} positions; pass --kv-pages {need} or a smaller --batch-size'
    )
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  return StreamingDecoder(
    model,
    greedy,
    max_len=-(-steps(conversations) // size) * size,
    kv='paged',
    pages=args.kv_pages,
    page_size=size,
    kv_dtype=args.kv_dtype,
  )


def duplex(args) -> int:
  from flmjax.codec.mimi_codec import load_mimi_codec
  from flmjax.data.manifest import check_manifest
  from flmjax.data.tokenizer import resolve_tokenizer
  from flmjax.decode.session import load_model
  from flmjax.eval.duplex import check_vocab, evaluate_duplex
  from flmjax.eval.report import markdown, write_report
  from flmjax.eval.stream import read_conversations
  from flmjax.outputs import check_out_dir

  for flag, value in (('--limit', args.limit), ('--batch-size', args.batch_size)):
    if value is not None and value < 1:
      raise ValueError(f'{flag} {value} must be >= 1')
  _check_paged(args)
  _check_window(args)
  check_manifest(args.data, '--data')  # before the model loads
  if args.asr_tts:
    check_manifest(args.asr_tts, '--asr-tts')
  check_out_dir(args.out, args.overwrite, REPORT_FILES)
  model = load_model(args.checkpoint, mimi_flag='--mimi')
  tokenizer = resolve_tokenizer(
    args.tokenizer, os.path.dirname(os.path.abspath(args.data)), args.checkpoint
  )
  if tokenizer is None:
    raise FileNotFoundError(
      f'no tokenizer beside --data {args.data} or --checkpoint {args.checkpoint}; pass --tokenizer'
    )
  check_vocab(model.cfg, tokenizer, f'--data {args.data}')
  codec = load_mimi_codec(args.mimi, model.cfg.num_codebooks) if args.mimi else None
  convs = read_conversations(args.data, model.cfg.num_codebooks, limit=args.limit, codec=codec)
  report = evaluate_duplex(
    model,
    args.data,
    tokenizer,
    batch_size=args.batch_size,
    codec=codec,
    conversations=convs,
    decoder=_window_decoder(args, model) or _paged_decoder(args, model, convs),
    progress=not args.no_progress,
    rules=args.rules,
    lead_frames=args.lead_frames,
    vad=args.vad,
  )
  report['teacher_forced'] = {
    k: {m: v[m] for m in ('acc_text', 'acc_semantic', 'loss')}
    for k, v in _teacher_forced(model, args, tokenizer, codec).items()
  }
  report.update(checkpoint=os.path.abspath(args.checkpoint), data=os.path.abspath(args.data))
  if args.attention_window is not None:
    report['attention_window'] = args.attention_window
  if args.kv_pages is not None:
    report['kv_cache'] = {
      'kv_pages': args.kv_pages,
      'page_size': args.page_size,
      'kv_dtype': args.kv_dtype,
    }
  paths = write_report(report, args.out, tokenizer, model.cfg)
  print(markdown(report))
  print(
    f'wrote {paths[0]}, {paths[1]} and {len(paths) - 2} timelines under '
    f'{os.path.join(args.out, "timelines")}'
  )
  return 0


def fdb(args) -> int:
  import json

  from flmjax.codec.mimi_codec import load_mimi_codec
  from flmjax.data.tokenizer import resolve_tokenizer
  from flmjax.decode.session import load_model
  from flmjax.eval.fdb import check_out, find_inputs, run_fdb, score

  if args.batch_size is not None and args.batch_size < 1:
    raise ValueError(f'--batch-size {args.batch_size} must be >= 1')
  if args.transcripts is not None and not os.path.isdir(args.transcripts):
    raise FileNotFoundError(f'--transcripts {args.transcripts}: no such directory')
  if args.transcripts is not None and args.rules is None:
    raise ValueError('--transcripts are scored: pass --rules fdb with them')
  check_out(args.out, args.overwrite, args.in_dir)
  find_inputs(args.in_dir)  # before the model loads
  model = load_model(args.checkpoint, mimi_flag='--mimi')
  tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint)
  if tokenizer is None:
    print(f'no tokenizer beside {args.checkpoint} (--tokenizer): output.json is not written')
  if args.mimi is None:
    from flmjax.codec.toy import ToyCodec

    codec = ToyCodec()
  else:
    codec = load_mimi_codec(args.mimi, model.cfg.num_codebooks)
  written = run_fdb(
    model,
    codec,
    args.in_dir,
    args.out,
    tokenizer=tokenizer,
    lead_frames=args.lead_frames,
    overwrite=args.overwrite,
    batch_size=args.batch_size,
    progress=not args.no_progress,
  )
  print(f'wrote {len(written)} output.wav/output.json files under {args.out}')
  if args.rules == 'fdb':
    scores = score(args.in_dir, args.out, args.transcripts)
    print(json.dumps(scores, indent=1))
  return 0


@command('flmjax eval', FLAGS)
def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  return duplex(args) if args.command == 'duplex' else fdb(args)
