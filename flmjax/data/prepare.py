"""`flmjax data prepare`: manifest -> validated, tokenized ArrayRecord shards + summary.json.

Bad lines are skipped and counted by reason (or, with strict=True, raise); nothing is dropped
silently: summary.json and the printed summary list every skipped line and why. The dataset is
written to a temporary folder beside OUT_DIR and renamed into place only when complete, so a
failure leaves no partial output and an existing dataset is replaced only with overwrite=True.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from flmjax.codec.base import Codec
from flmjax.data import manifest as mf
from flmjax.data.monologue import MODES, layout_monologue
from flmjax.data.records import FRAMES, SUMMARY, Record, encode_record, monologue_sentences
from flmjax.data.tokenizer import Tokenizer
from flmjax.outputs import check_out_dir


def entry_to_record(
  entry: mf.Entry,
  tokenizer: Tokenizer,
  codec: Codec | None,
  codes: dict[str, np.ndarray] | None = None,
) -> Record:
  """Loads (unless `codes` are given), validates and tokenizes one manifest entry; raises
  ManifestError."""
  codes = mf.load_codes(entry, codec) if codes is None else codes
  num_frames = next(iter(codes.values())).shape[1]
  mf.check_segments(entry, num_frames)
  sentences = []
  for i, s in enumerate(entry.segments):
    ids = tokenizer.encode(s.text)
    if not ids:
      raise mf.ManifestError(
        f'{entry.where}: segment {i}', f'text {s.text!r} has no tokens', 'empty_text'
      )
    sentences.append((s.speaker, s.start_frame, s.end_frame, ids))
  return Record(entry.id, entry.kind, codes, sentences)


def _records(entries, tokenizer: Tokenizer, codec: Codec | None, audio_batch: int, stats: dict):
  """Yields a Record or a ManifestError for every manifest line, in order. Audio lines are read
  `audio_batch` lines at a time and encoded together (codec.encode_batch)."""
  chunk = []
  for entry in entries:
    chunk.append(entry)
    if len(chunk) == audio_batch:
      yield from _chunk_records(chunk, tokenizer, codec, stats)
      chunk = []
  yield from _chunk_records(chunk, tokenizer, codec, stats)


def _chunk_records(chunk, tokenizer, codec, stats):
  waves = {}  # chunk index -> {speaker: wave} or the ManifestError reading it raised
  for i, entry in enumerate(chunk):
    if isinstance(entry, mf.Entry) and entry.codes is None:
      try:
        waves[i] = mf.read_waves(entry, codec)
      except mf.ManifestError as e:
        waves[i] = e
  flat = [(i, s, w) for i, ws in waves.items() if isinstance(ws, dict) for s, w in ws.items()]
  encoded: dict[int, dict[str, np.ndarray]] = {}
  if flat:
    start = time.perf_counter()
    for (i, s, _), codes in zip(flat, codec.encode_batch([w for _, _, w in flat])):
      encoded.setdefault(i, {})[s] = codes
    stats['encode_seconds'] += time.perf_counter() - start
    stats['audio_seconds'] += sum(w.size for _, _, w in flat) / codec.sample_rate
  for i, entry in enumerate(chunk):
    try:
      if isinstance(entry, mf.ManifestError):
        raise entry
      if isinstance(waves.get(i), mf.ManifestError):
        raise waves[i]
      codes = mf.check_encoded(entry, encoded[i]) if i in encoded else None
      yield entry_to_record(entry, tokenizer, codec, codes)
    except mf.ManifestError as e:
      yield e


def _replace_dir(tmp: str, out_dir: str) -> None:
  """Renames the finished `tmp` onto `out_dir`; an old `out_dir` is moved aside first, then
  removed."""
  if not os.path.exists(out_dir):
    os.rename(tmp, out_dir)
    return
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=os.path.dirname(out_dir))
  os.rename(out_dir, os.path.join(old, 'dataset'))
  os.rename(tmp, out_dir)
  shutil.rmtree(old)


def prepare(
  manifest: str,
  out_dir: str,
  tokenizer: Tokenizer,
  *,
  codec: Codec | None = None,
  strict: bool = False,
  records_per_shard: int = 4096,
  progress: bool = True,
  overwrite: bool = False,
  audio_batch: int = 64,
) -> dict:
  """Writes `out_dir/records-NNNNN.array_record` and `out_dir/summary.json`; returns the summary."""
  from tqdm import tqdm

  out_dir = os.path.abspath(out_dir)
  total = mf.check_manifest(manifest)
  check_out_dir(out_dir, overwrite, marker=SUMMARY, ours='a prepared dataset')
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=os.path.dirname(out_dir))
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
  entries = tqdm(
    mf.read_manifest(manifest),
    total=total,
    desc='prepare',
    unit='sample',
    disable=not progress,
    file=sys.stderr,
  )
  try:
    summary = _write(
      entries, manifest, tmp, tokenizer, codec, strict, records_per_shard, audio_batch
    )
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    entries.close()  # ends the progress line, so an error message starts on its own line
  return summary


def _write(
  entries,
  manifest: str,
  out_dir: str,
  tokenizer: Tokenizer,
  codec: Codec | None,
  strict: bool,
  records_per_shard: int,
  audio_batch: int,
) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter

  files, skipped, kinds = [], [], collections.Counter()
  layout = {m: collections.Counter() for m in MODES}  # pushes and cuts at offset 0, for the report
  frames = []  # per record, for the loader's window count
  writer = None
  stats = {'audio_seconds': 0.0, 'encode_seconds': 0.0}
  start = time.perf_counter()
  try:
    for record in _records(entries, tokenizer, codec, audio_batch, stats):
      if stats['audio_seconds'] and hasattr(entries, 'set_postfix_str'):
        entries.set_postfix_str(f'{stats["audio_seconds"] / 3600:.2f} h audio', refresh=False)
      if isinstance(record, mf.ManifestError):
        if strict:
          raise record
        skipped.append({'reason': record.reason, 'message': str(record)})
        continue
      if writer is None or kinds.total() % records_per_shard == 0:
        if writer is not None:
          writer.close()
        files.append(f'records-{len(files):05d}.array_record')
        # group_size:1 keeps every record randomly accessible for grain.
        writer = ArrayRecordWriter(os.path.join(out_dir, files[-1]), 'group_size:1')
      writer.write(encode_record(record))
      for mode in MODES:
        _, pushed, cut = layout_monologue(
          monologue_sentences(record), record.num_frames, mode, 0, -1
        )
        layout[mode].update(pushed_frames=pushed, cut_tokens=cut)
      kinds[record.kind] += 1
      frames.append(record.num_frames)
  finally:
    if writer is not None:
      writer.close()
  wall = time.perf_counter() - start
  reasons = dict(collections.Counter(s['reason'] for s in skipped))
  if not kinds:
    first = f'; first: {skipped[0]["message"]}' if skipped else ''
    raise mf.ManifestError(
      manifest,
      f'no usable samples: all {len(skipped)} line(s) were rejected {reasons}{first}',
      'no_samples',
    )
  summary = {
    'manifest': os.path.abspath(manifest),
    'files': files,
    'num_records': kinds.total(),
    'num_frames': sum(frames),
    'kinds': dict(kinds),
    'num_skipped': len(skipped),
    'skipped_by_reason': reasons,
    'skipped': skipped,
    'audio_hours': stats['audio_seconds'] / 3600,
    'wall_seconds': wall,
    'encode_seconds': stats['encode_seconds'],
    'monologue_at_offset_0': {
      m: {'pushed_frames': c['pushed_frames'], 'cut_tokens': c['cut_tokens']}
      for m, c in layout.items()
    },
  }
  np.save(os.path.join(out_dir, FRAMES), np.asarray(frames, np.int32))
  with open(os.path.join(out_dir, SUMMARY), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def format_summary(summary: dict) -> str:
  lines = [
    f'prepared {summary["num_records"]} samples ({summary["num_frames"]} frames, '
    f'{summary["kinds"]}) from {summary["manifest"]}',
    'monologue at offset 0 (frames pushed, tokens cut): '
    + ', '.join(
      f'{m} {c["pushed_frames"]}, {c["cut_tokens"]}'
      for m, c in summary['monologue_at_offset_0'].items()
    ),
    f'skipped {summary["num_skipped"]}: {summary["skipped_by_reason"] or "none"}',
  ]
  if summary.get('audio_hours'):
    hours, wall = summary['audio_hours'], summary['wall_seconds']
    lines.append(
      f'encoded {hours:.3f} h of audio in {wall:.1f} s of wall time: '
      f'{hours / max(wall, 1e-9):.4f} h of audio per second '
      f'({summary["encode_seconds"]:.1f} s in the codec)'
    )
  lines += [f'  skipped {s["message"]}' for s in summary['skipped']]
  return '\n'.join(lines)
