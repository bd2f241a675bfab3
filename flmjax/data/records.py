"""One prepared sample as an ArrayRecord record (msgpack): codes per speaker and tokenized
sentences, before any layout (layout happens at load time, per stage)."""

from __future__ import annotations

import dataclasses
import json
import os

import msgpack
import numpy as np

from flmjax.codec.base import NUM_CODEBOOKS

SUMMARY = 'summary.json'
FRAMES = 'record_frames.npy'  # int32 [records]: each record's frames, in record order


@dataclasses.dataclass
class Record:
  id: str
  kind: str  # 'tts_asr' | 'duplex'
  codes: dict[str, np.ndarray]  # speaker -> int16 [8, F]; tts_asr holds its one speaker
  sentences: list[tuple[str, int, int, list[int]]]  # (speaker, start_frame, end_frame, token ids)

  @property
  def num_frames(self) -> int:
    return next(iter(self.codes.values())).shape[1]


def monologue_sentences(record: Record) -> list[tuple[int, int, list[int]]]:
  """The sentences the text channel transcribes: the model's in a duplex sample, else all."""
  speaker = 'model' if record.kind == 'duplex' else next(iter(record.codes))
  return [(a, b, ids) for s, a, b, ids in record.sentences if s == speaker]


def turn_starts(record: Record) -> list[int]:
  """The frames where the user's turns start in a duplex sample (none in a tts_asr one): each
  user sentence's start, except one that only resumes the user's speech after a pause (no model
  sentence starts in between; the same rule as flmjax.data.events)."""
  if record.kind != 'duplex':
    return []
  user = sorted((a, b) for s, a, b, _ in record.sentences if s == 'user')
  model = [a for s, a, _, _ in record.sentences if s == 'model']
  return [
    a for i, (a, _) in enumerate(user) if i == 0 or any(user[i - 1][1] <= m < a for m in model)
  ]


def encode_record(r: Record) -> bytes:
  return msgpack.packb(
    {
      'id': r.id,
      'kind': r.kind,
      'frames': r.num_frames,
      'codes': {s: np.ascontiguousarray(c, np.int16).tobytes() for s, c in r.codes.items()},
      'sentences': [[s, int(a), int(b), [int(t) for t in ids]] for s, a, b, ids in r.sentences],
    },
    use_bin_type=True,
  )


def decode_record(data: bytes) -> Record:
  obj = msgpack.unpackb(data, raw=False)
  frames = obj['frames']
  codes = {
    s: np.frombuffer(b, np.int16).reshape(NUM_CODEBOOKS, frames) for s, b in obj['codes'].items()
  }
  sentences = [(s, a, b, ids) for s, a, b, ids in obj['sentences']]
  return Record(obj['id'], obj['kind'], codes, sentences)


def record_files(prepared_dir: str | os.PathLike) -> list[str]:
  """The ArrayRecord shards of a folder written by `flmjax data prepare`, in order."""
  prepared_dir = str(prepared_dir)
  summary = os.path.join(prepared_dir, SUMMARY)
  if not os.path.isfile(summary):
    raise FileNotFoundError(
      f'{prepared_dir!r} is not a prepared dataset: no {SUMMARY} '
      '(run `flmjax data prepare MANIFEST OUT_DIR` first)'
    )
  with open(summary) as f:
    files = [os.path.join(prepared_dir, name) for name in json.load(f)['files']]
  if not files:
    raise ValueError(f'{prepared_dir!r}: the prepared dataset holds no records ({summary})')
  missing = [p for p in files if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f'{prepared_dir!r}: shard(s) listed in {SUMMARY} are missing: {missing}'
    )
  return files


def record_frames(prepared_dir: str | os.PathLike) -> np.ndarray:
  """Frames per record (int32 [records], in the order of `record_files`), written by prepare so
  that the loader can size its windows without reading the records."""
  path = os.path.join(str(prepared_dir), FRAMES)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{prepared_dir!r}: no {FRAMES}; it was prepared by an older flmjax '
      '(run `flmjax data prepare MANIFEST OUT_DIR` again)'
    )
  return np.load(path)


def read_all(prepared_dir: str | os.PathLike) -> list[Record]:
  """Every record of a prepared folder, in order (for tests and tools, not for training)."""
  from array_record.python.array_record_module import ArrayRecordReader

  out = []
  for path in record_files(prepared_dir):
    reader = ArrayRecordReader(path)
    out += [decode_record(b) for b in reader.read_all()]
    reader.close()
  return out
