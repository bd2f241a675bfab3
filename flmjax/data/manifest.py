"""The dataset manifest (JSONL) and its validation. The format is documented in docs/data.md
("Manifest format").

One line per conversation (`duplex`) or single-speaker utterance (`tts_asr`):
  {"id": "d0001", "kind": "duplex", "sample_rate": 24000,
   "audio": "wav/d0001.wav",                       # stereo: ch 0 model, ch 1 user
   "codes": {"model": "c/m.npy", "user": "c/u.npy"},  # or precomputed codes [n_codebooks, frames]
   "segments": [{"speaker": "user", "start": 0.4, "end": 1.6, "text": "what is two plus three"}]}
Exactly one of "audio" / "codes". Paths are relative to the manifest's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from flmjax.codec.base import (
  CODEBOOK_SIZE,
  FRAME_RATE,
  NUM_CODEBOOKS,
  Codec,
)
from flmjax.data import audio as audio_lib
from flmjax.errors import FlmjaxError

KINDS = ('tts_asr', 'duplex')
SPEAKERS = ('model', 'user')


class ManifestError(FlmjaxError, ValueError):
  """A manifest line is bad; the message names the file and line. `reason` is a short category."""

  def __init__(self, where: str, message: str, reason: str):
    super().__init__(f'{where}: {message}')
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Segment:
  speaker: str
  start: float  # seconds
  end: float  # seconds, exclusive
  text: str

  @property
  def start_frame(self) -> int:
    return int(round(self.start * FRAME_RATE))

  @property
  def end_frame(self) -> int:
    return int(round(self.end * FRAME_RATE))


@dataclasses.dataclass(frozen=True)
class Entry:
  where: str  # "path:line" for messages
  id: str
  kind: str
  sample_rate: int | None
  audio: str | None  # absolute path
  codes: dict[str, str] | None  # speaker -> absolute .npy path
  segments: tuple[Segment, ...]
  num_codebooks: int = NUM_CODEBOOKS  # rows of each codes .npy (a full Mimi dump: 32)
  events: tuple[tuple[str, int, int], ...] | None = None  # turn-taking events, when given

  @property
  def speakers(self) -> tuple[str, ...]:
    return tuple(sorted({s.speaker for s in self.segments}))


def _need(ok: bool, where: str, message: str, reason: str):
  if not ok:
    raise ManifestError(where, message, reason)


def parse_line(text: str, where: str, base_dir: str) -> Entry:
  """Parses one JSONL line; raises ManifestError naming `where` ("file:line")."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ManifestError(where, f'not valid JSON ({e.msg} at column {e.colno})', 'bad_json') from e
  _need(isinstance(obj, dict), where, 'a line must be a JSON object', 'bad_json')
  missing = [k for k in ('id', 'kind', 'segments') if k not in obj]
  _need(not missing, where, f'missing field(s) {missing}', 'missing_field')
  _need(
    ('audio' in obj) != ('codes' in obj),
    where,
    'give exactly one of "audio" (a file) or "codes" (precomputed .npy per speaker)',
    'missing_field',
  )
  kind = obj['kind']
  _need(kind in KINDS, where, f'field "kind" is {kind!r}; use one of {list(KINDS)}', 'bad_field')
  rate = obj.get('sample_rate')
  if 'audio' in obj:
    _need('sample_rate' in obj, where, "missing field(s) ['sample_rate']", 'missing_field')
  _need(
    rate is None or (isinstance(rate, int) and rate > 0),
    where,
    f'field "sample_rate" is {rate!r}; need a positive integer (Hz)',
    'bad_field',
  )
  _need(
    isinstance(obj['segments'], list) and obj['segments'],
    where,
    'field "segments" must be a non-empty list',
    'bad_field',
  )
  segments = []
  for i, seg in enumerate(obj['segments']):
    at = f'{where}: segment {i}'
    _need(isinstance(seg, dict), at, 'must be an object', 'bad_field')
    miss = [k for k in ('speaker', 'start', 'end', 'text') if k not in seg]
    _need(not miss, at, f'missing field(s) {miss}', 'missing_field')
    _need(
      seg['speaker'] in SPEAKERS,
      at,
      f'speaker {seg["speaker"]!r} is not one of {list(SPEAKERS)}',
      'bad_field',
    )
    _need(
      all(
        isinstance(seg[k], (int, float)) and not isinstance(seg[k], bool) and math.isfinite(seg[k])
        for k in ('start', 'end')
      ),
      at,
      f'start and end must be finite numbers (seconds), got {seg["start"]!r} and {seg["end"]!r}',
      'bad_field',
    )
    _need(
      isinstance(seg['text'], str), at, f'text must be a string, got {seg["text"]!r}', 'bad_field'
    )
    _need(seg['text'].strip() != '', at, 'empty text', 'empty_text')
    segments.append(Segment(seg['speaker'], float(seg['start']), float(seg['end']), seg['text']))
  audio = codes = None
  if 'audio' in obj:
    _need(isinstance(obj['audio'], str), where, 'field "audio" must be a path', 'bad_field')
    audio = os.path.join(base_dir, obj['audio'])
  else:
    _need(
      isinstance(obj['codes'], dict)
      and obj['codes']
      and set(obj['codes']) <= set(SPEAKERS)
      and all(isinstance(v, str) for v in obj['codes'].values()),
      where,
      f'field "codes" must map speakers {list(SPEAKERS)} to .npy paths, got {obj["codes"]!r}',
      'bad_field',
    )
    codes = {k: os.path.join(base_dir, v) for k, v in obj['codes'].items()}
  books = obj.get('num_codebooks', NUM_CODEBOOKS)
  _need(
    isinstance(books, int)
    and not isinstance(books, bool)
    and NUM_CODEBOOKS <= books <= MAX_CODEBOOKS,
    where,
    f'field "num_codebooks" is {books!r}; need an integer in {NUM_CODEBOOKS}..{MAX_CODEBOOKS} '
    '(the rows of each codes .npy)',
    'bad_field',
  )
  _need(
    codes is not None or 'num_codebooks' not in obj,
    where,
    'field "num_codebooks" describes "codes"; an "audio" line has none',
    'bad_field',
  )
  events = obj.get('events')
  _need(
    events is None
    or isinstance(events, list)
    and all(isinstance(e, list) and len(e) == 3 for e in events),
    where,
    f'field "events" must be a list of [kind, start_frame, end_frame], got {events!r}',
    'bad_field',
  )
  events = None if events is None else tuple(tuple(e) for e in events)
  entry = Entry(where, str(obj['id']), kind, rate, audio, codes, tuple(segments), books, events)
  if kind == 'tts_asr':
    _need(
      len(entry.speakers) == 1,
      where,
      f'a tts_asr sample has one speaker; segments name {list(entry.speakers)}',
      'bad_field',
    )
  return entry


def manifest_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | ManifestError]]:
  """(line number, the line's text or the ManifestError of a line that is not UTF-8) per
  non-blank line, decoded one at a time: one bad byte rejects one line, not the file."""
  path = str(path)
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, start=1):
      where = f'{path}:{n}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        yield (
          n,
          ManifestError(
            where,
            f'not UTF-8 text (byte 0x{raw[e.start]:02x} at column '
            f'{e.start + 1}); save the manifest as UTF-8',
            'not_utf8',
          ),
        )
        continue
      if line.strip():
        yield n, line


def read_manifest(path: str | os.PathLike) -> Iterator[Entry | ManifestError]:
  """Yields one Entry, or the ManifestError that rejects it, per non-blank line."""
  base = os.path.dirname(os.path.abspath(str(path)))
  for n, line in manifest_lines(path):
    if isinstance(line, ManifestError):
      yield line
      continue
    try:
      yield parse_line(line, f'{path}:{n}', base)
    except ManifestError as e:
      yield e


def check_manifest(path: str | os.PathLike, flag: str = 'manifest') -> int:
  """A manifest to read whole: a file (not a folder), not empty, and text rather than binary
  data (a NUL byte, which no JSON text holds). Returns its count of non-blank lines; the error
  names `flag` and the path."""
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{flag} {path}: '
      + ('is a directory; give the .jsonl file' if os.path.isdir(path) else 'no such file')
    )
  with open(path, 'rb') as f:
    head = f.read(1 << 16)
  nul = head.find(b'\0')
  if nul >= 0:
    raise ManifestError(
      f'{flag} {path}',
      f'binary data, not a JSONL manifest (a NUL byte at offset {nul}); give the manifest: '
      'UTF-8 text, one JSON object per line (see docs/data.md)',
      'binary',
    )
  total = count_lines(path)
  if total == 0:
    raise ManifestError(
      f'{flag} {path}',
      'the manifest is empty: one JSON object per line (see docs/data.md)',
      'empty_manifest',
    )
  return total


def count_lines(path: str | os.PathLike) -> int:
  """Non-blank lines of a manifest (for progress), without decoding them."""
  with open(path, 'rb') as f:
    return sum(1 for line in f if line.strip())


MAX_CODEBOOKS = 32  # Mimi's full residual quantizer; FLM-Audio reads the first 8


def _check_codes(codes: Any, where: str, name: str, num_codebooks: int | None) -> np.ndarray:
  """num_codebooks: the rows the manifest line declares (None: a codec's output, 8..32 rows)."""
  shape = getattr(codes, 'shape', type(codes).__name__)
  _need(
    isinstance(codes, np.ndarray) and codes.ndim == 2,
    where,
    f'codes {name!r} must be a 2-D array [codebooks, frames], got shape {shape}',
    'bad_codes',
  )
  rows, cols = codes.shape
  want = num_codebooks or NUM_CODEBOOKS
  if (
    rows != want and cols == want or rows > MAX_CODEBOOKS and NUM_CODEBOOKS <= cols <= MAX_CODEBOOKS
  ):
    raise ManifestError(
      where,
      f'codes {name!r} have shape {shape}, which looks transposed '
      f'([frames, codebooks]); save them as [codebooks, frames] (codes.T)',
      'bad_codes',
    )
  if num_codebooks is None:
    _need(
      NUM_CODEBOOKS <= rows <= MAX_CODEBOOKS,
      where,
      f'codes {name!r} must be [codebooks, frames] with {NUM_CODEBOOKS} to {MAX_CODEBOOKS} '
      f'codebooks, got shape {shape}',
      'bad_codes',
    )
  else:
    hint = (
      f'; a dump of {rows} codebooks declares "num_codebooks": {rows} on its line'
      if NUM_CODEBOOKS < rows <= MAX_CODEBOOKS
      else ''
    )
    _need(
      rows == num_codebooks,
      where,
      f'codes {name!r} have shape {shape}: {rows} codebooks, but the line has '
      f'"num_codebooks": {num_codebooks} (default {NUM_CODEBOOKS}){hint}',
      'bad_codes',
    )
  _need(
    cols > 0,
    where,
    f'codes {name!r} have 0 frames (shape {shape}); drop the sample or re-encode its audio',
    'bad_codes',
  )
  _need(
    np.issubdtype(codes.dtype, np.integer),
    where,
    f'codes {name!r} have dtype {codes.dtype}; need integers',
    'bad_codes',
  )
  codes = codes[:NUM_CODEBOOKS]  # FLM-Audio uses Mimi's first 8 codebooks
  if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
    bad = codes[(codes < 0) | (codes >= CODEBOOK_SIZE)].ravel()[0]
    raise ManifestError(
      where, f'codes {name!r} hold {int(bad)}, outside 0..{CODEBOOK_SIZE - 1}', 'bad_codes'
    )
  return codes.astype(np.int16)


def read_npy(path: str) -> np.ndarray:
  """np.load with errors that name the file: missing, truncated or not a .npy at all."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(
      f'{path}: not a readable .npy file (truncated or another format: {e})'
    ) from None


def load_codes(entry: Entry, codec: Codec | None) -> dict[str, np.ndarray]:
  """The sample's codes per speaker, int16 [8, frames]; a tts_asr sample has its one speaker."""
  speakers = SPEAKERS if entry.kind == 'duplex' else entry.speakers
  out = {}
  if entry.codes is not None:
    for s in speakers:
      _need(s in entry.codes, entry.where, f'codes for speaker {s!r} are missing', 'missing_field')
      try:
        raw = read_npy(entry.codes[s])
      except (OSError, ValueError) as e:
        raise ManifestError(entry.where, f'cannot read codes: {e}', 'unreadable') from e
      out[s] = _check_codes(raw, entry.where, entry.codes[s], entry.num_codebooks)
  else:
    waves = read_waves(entry, codec)
    return check_encoded(entry, dict(zip(waves, codec.encode_batch(list(waves.values())))))
  return check_encoded(entry, out)


def read_waves(entry: Entry, codec: Codec | None) -> dict[str, np.ndarray]:
  """An `audio` entry's wave per speaker, float32 [samples] at the codec's rate."""
  speakers = SPEAKERS if entry.kind == 'duplex' else entry.speakers
  _need(
    codec is not None,
    entry.where,
    'audio needs a codec (`codec`, or give precomputed "codes")',
    'no_codec',
  )
  try:
    wave = audio_lib.read_audio(
      entry.audio,
      sample_rate=entry.sample_rate,
      channels=len(speakers),
      target_rate=codec.sample_rate,
    )
  except audio_lib.AudioError as e:
    raise ManifestError(entry.where, str(e), e.reason) from e
  return dict(zip(speakers, wave))  # duplex: ch 0 model, ch 1 user


def check_encoded(entry: Entry, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Checks each speaker's codes (when a codec made them) and that all speakers have the same
  number of frames."""
  if entry.codes is None:
    codes = {s: _check_codes(c, entry.where, f'{entry.audio}[{s}]', None) for s, c in codes.items()}
  frames = {s: c.shape[1] for s, c in codes.items()}
  _need(
    len(set(frames.values())) == 1,
    entry.where,
    f'speakers have different numbers of frames: {frames}',
    'bad_codes',
  )
  return codes


def check_segments(entry: Entry, num_frames: int):
  """Segments must be forward, inside the audio, and not overlap within a speaker."""
  duration = num_frames / FRAME_RATE
  for i, s in enumerate(entry.segments):
    at = f'{entry.where}: segment {i}'
    _need(
      s.end > s.start, at, f'reversed or empty: start {s.start} s, end {s.end} s', 'bad_segment'
    )
    _need(
      s.start >= 0 and s.end_frame <= num_frames,
      at,
      f'[{s.start}, {s.end}] s lies outside the audio (0 to {duration:.2f} s)',
      'bad_segment',
    )
  for speaker in SPEAKERS:
    own = sorted((s.start, s.end, i) for i, s in enumerate(entry.segments) if s.speaker == speaker)
    for (_, end_a, i), (start_b, _, j) in zip(own, own[1:]):
      _need(
        start_b >= end_a,
        entry.where,
        f'segments {i} and {j} of speaker {speaker!r} overlap ({start_b} s < {end_a} s)',
        'bad_segment',
      )
