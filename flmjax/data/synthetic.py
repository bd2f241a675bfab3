"""The embedded synthetic corpus: a toy spoken language that trains and is judged on CPU offline.

- Language: number words zero..twenty and a few others. Questions ("what comes after nine",
  "what comes before four") have one right answer ("it is ten"): answering needs the question's
  audio, so a model has to listen. The 40 questions are few enough for the tiny model to learn
  them all in a few CPU minutes; held-out conversations combine them anew, in new voices, noise
  and timing.
- Toy speech: each word is 1-2 frames of semantic codes fixed per word; acoustic codes depend on
  word, speaker and per-frame noise. Silence has its own codes. Codes lie in 0..2047.
- Samples: single-speaker tts_asr utterances and duplex conversations (the user asks 2-5
  questions, the model answers each after a short gap; the user may pause inside a question or
  barge in while the model answers), written in the manifest format with
  `.npy` codes (or, with write_audio, as ToyCodec wav files), so they take exactly the real
  data's code path.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from flmjax.codec.base import CODEBOOK_SIZE, FRAME_RATE, NUM_CODEBOOKS, SAMPLE_RATE
from flmjax.codec.toy import ToyCodec
from flmjax.config import ModelConfig
from flmjax.data.events import events_from_segments
from flmjax.data.timing import (
  BARGE_IN_RICH,
  DIRECTION_PAUSE,
  HELDOUT_VARIANTS,
  PAUSED_QUICK_STOP,
  QUICK_STOP,
  TRAINING,
  Timing,
)
from flmjax.data.tokenizer import train_sentencepiece

NUMBERS = (
  'zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
  'fifteen sixteen seventeen eighteen nineteen twenty'
).split()
FILLERS = (
  'hello there',
  'good morning',
  'thank you',
  'i think so',
  'okay',
  'yes',
  'no',
  'the answer is easy',
  'ask me a question',
  'that is right',
)
WORDS = tuple(
  sorted(
    set(NUMBERS)
    | set('what is plus minus comes after before it'.split())
    | {w for s in FILLERS for w in s.split()}
  )
)
MODEL_SPEAKER = 0  # the model speaks with one voice; users and tts_asr speakers vary
NUM_SPEAKERS = 4
# Text ids must stay below the tiny config's specials (BOS 316, WAIT 317, EOS 318).
MAX_TEXT_ID = ModelConfig.tiny().text_bos_id


class ToySpeech:
  """Deterministic word -> codes [8, frames]; fixed for every corpus seed (it is "the codec")."""

  def __init__(self):
    rng = np.random.default_rng(20250902)
    n = len(WORDS) + 1  # the last entry is silence
    self.lengths = 1 + (rng.integers(2, 5, size=n) >= 3)  # frames per word: 1 or 2
    self.lengths[-1] = 1
    self.semantic = rng.choice(np.arange(1, CODEBOOK_SIZE), size=(n, 4), replace=False)  # [n, 4]
    self.acoustic = rng.integers(0, CODEBOOK_SIZE, size=(n, 4, NUM_CODEBOOKS - 1))  # [n, 4, 7]
    self.voice = rng.integers(0, CODEBOOK_SIZE, size=(NUM_SPEAKERS, NUM_CODEBOOKS - 1))  # [S, 7]
    self.index = {w: i for i, w in enumerate(WORDS)}

  def frames(self, units: list[tuple[int, int]], speaker: int, rng) -> np.ndarray:
    """units: (word index, frame within word) per frame -> int32 [8, F]."""
    w, i = np.array(units, np.int64).reshape(-1, 2).T
    noise = rng.integers(-3, 4, size=(len(w), NUM_CODEBOOKS - 1))  # [F, 7]
    acoustic = (self.acoustic[w, i] + self.voice[speaker] + noise) % CODEBOOK_SIZE  # [F, 7]
    return np.concatenate([self.semantic[w, i][:, None], acoustic], 1).T.astype(np.int32)

  def speak(self, text: str, speaker: int, rng) -> np.ndarray:
    units = [(self.index[w], i) for w in text.split() for i in range(self.lengths[self.index[w]])]
    return self.frames(units, speaker, rng)

  def silence(self, num_frames: int, speaker: int, rng) -> np.ndarray:
    return self.frames([(len(WORDS), 0)] * num_frames, speaker, rng)


def question_answer(rng, style: str = 'it is') -> tuple[str, str]:
  """One of the 40 questions and its only right answer, `style` X ('that is' for the LoRA
  demo's new answer style: every word of it is in WORDS)."""
  if rng.integers(2) == 0:
    a = int(rng.integers(0, 20))
    return f'what comes after {NUMBERS[a]}', f'{style} {NUMBERS[a + 1]}'
  a = int(rng.integers(1, 21))
  return f'what comes before {NUMBERS[a]}', f'{style} {NUMBERS[a - 1]}'


def _seconds(frame: int) -> float:
  return round(frame / FRAME_RATE, 4)


SILENCE = len(WORDS)  # the unit index of silence in ToySpeech's tables


def silence_code() -> int:
  """The semantic code of silence in the toy speech (what the model emits when it is quiet)."""
  return int(ToySpeech().semantic[SILENCE, 0])


class _Track:
  """One sample's timeline: per speaker, the (word, frame within word) unit of every frame, with
  sentence segments. The codes (with their per-frame noise) are drawn at the end."""

  def __init__(self, speech: ToySpeech, voices: dict[str, int], rng):
    self.speech, self.voices, self.rng = speech, voices, rng
    self.units = {s: [] for s in voices}  # speaker -> [(word, frame in word)] per frame
    self.segments, self.words = [], []  # words: (text, first frame) per segment

  @property
  def frames(self) -> int:
    return max(len(u) for u in self.units.values())

  def _pad(self, frames: int):
    for u in self.units.values():
      u.extend([(SILENCE, 0)] * (frames - len(u)))

  def pause(self, n: int):
    self._pad(self.frames + n)

  def say(self, speaker: str, text: str, start: int | None = None, rate: float = 1.0) -> int:
    """Speaks `text` from frame `start` (default: the end of the timeline), where this speaker is
    silent; the other speakers may talk at the same time. At `rate` a word of L frames lasts
    max(1, round(L * rate)), each of its frames repeated. Returns the segment's index."""
    start = self.frames if start is None else start
    own, words = self.units[speaker], []
    units = []
    for w in text.split():
      words.append((w, start + len(units)))
      length = int(self.speech.lengths[self.speech.index[w]])
      n = max(1, round(length * rate))
      units += [(self.speech.index[w], j * length // n) for j in range(n)]
    self._pad(max(self.frames, start + len(units)))
    assert all(u[0] == SILENCE for u in own[start : start + len(units)]), (
      'a speaker overlaps itself'
    )
    own[start : start + len(units)] = units
    self.segments.append(
      {
        'speaker': speaker,
        'start': _seconds(start),
        'end': _seconds(start + len(units)),
        'text': text,
      }
    )
    self.words.append(words)
    return len(self.segments) - 1

  def cut(self, index: int, stop: int):
    """The speaker of segment `index` falls silent at frame `stop`; the segment keeps the words it
    had begun."""
    seg, words = self.segments[index], self.words[index]
    end = round(seg['end'] * FRAME_RATE)
    own = self.units[seg['speaker']]
    own[stop:end] = [(SILENCE, 0)] * (end - stop)
    self.words[index] = [(w, f) for w, f in words if f < stop]
    seg['text'] = ' '.join(w for w, _ in self.words[index])
    seg['end'] = _seconds(stop)

  def truncate(self, frames: int):
    assert all(u[0] == SILENCE for v in self.units.values() for u in v[frames:]), 'cuts speech'
    for u in self.units.values():
      del u[frames:]

  def codes(self) -> dict[str, np.ndarray]:
    return {s: self.speech.frames(u, self.voices[s], self.rng) for s, u in self.units.items()}


def tts_asr_sample(speech: ToySpeech, rng) -> _Track:
  track = _Track(speech, {'model': int(rng.integers(NUM_SPEAKERS))}, rng)
  track.pause(int(rng.integers(1, 4)))
  for k in range(int(rng.integers(1, 3))):
    if k:
      track.pause(int(rng.integers(2, 5)))
    q, a = question_answer(rng)
    track.say('model', [q, a, FILLERS[rng.integers(len(FILLERS))]][rng.integers(3)])
  # Trimmed like real ASR utterances: often no silence after the last word, so a trailing
  # (ASR-style) monologue runs past the audio and the loader extends the sample.
  track.pause(int(rng.integers(0, 3)))
  return track


def qa_sample(speech: ToySpeech, rng) -> _Track:
  """One speaker asks one of the 40 questions and answers it ("what comes after nine", "it is
  ten"): single-speaker data in which a question's answer follows it, as a pretrained backbone
  has read such text (tts_asr_sample draws the question and the answer apart)."""
  track = _Track(speech, {'model': int(rng.integers(NUM_SPEAKERS))}, rng)
  track.pause(int(rng.integers(1, 4)))
  q, a = question_answer(rng)
  track.say('model', q)
  track.pause(int(rng.integers(1, 4)))
  track.say('model', a)
  track.pause(int(rng.integers(0, 3)))
  return track


def duplex_sample(
  speech: ToySpeech, rng, answer_style: str = 'it is', timing: Timing = TRAINING
) -> _Track:
  """2-5 exchanges: the user asks (at one speaking rate per conversation), the model answers after
  a gap. A question may be split by a pause (the model must wait: the question is not complete)
  and may cut the model's previous answer short (a barge-in: the model must stop a frame or two
  later). `timing` draws every length; the events follow from the segments (_write).
  `answer_style` starts every answer (see question_answer)."""
  voices = {'model': MODEL_SPEAKER, 'user': int(rng.integers(1, NUM_SPEAKERS))}
  track = _Track(speech, voices, rng)
  rate = timing.speaking_rate(rng)
  track.pause(int(rng.integers(1, 4)))
  answer = None  # the segment index of the model's previous answer
  for _ in range(int(rng.integers(2, 6))):
    q, a = question_answer(rng, answer_style)
    barge_in = answer is not None and rng.random() < timing.barge_in_p
    words = q.split()
    split = len(words)
    if rng.random() < timing.pause_p:
      points = timing.split_after
      split = int(points[rng.integers(len(points))] if points else rng.integers(1, len(words)))
    first, rest = ' '.join(words[:split]), ' '.join(words[split:])
    if barge_in:
      start = round(track.segments[answer]['start'] * FRAME_RATE)
      end = round(track.segments[answer]['end'] * FRAME_RATE)
      onset = start + int(rng.integers(1, end - start - 1))  # the model has begun, not finished
      stop = min(onset + timing.frames(rng, 'cut_frames'), end)
      track.cut(answer, stop)  # the answer was the last speech: the rest is silence
      track.truncate(stop)
      track.say('user', first, start=onset, rate=rate)
    else:
      track.say('user', first, rate=rate)
    # gaps count from the user's last frame: a cut model may outlast a short first word by a frame
    user_end = lambda: round(track.segments[-1]['end'] * FRAME_RATE)
    if rest:
      pause_start = user_end()
      track._pad(max(track.frames, pause_start + timing.frames(rng, 'pause_frames')))
      track.say('user', rest, rate=rate)
    turn_end = user_end()
    track._pad(max(track.frames, turn_end + timing.frames(rng, 'answer_gap')))
    answer = track.say('model', a)
    track.pause(timing.frames(rng, 'after_answer'))
  return track


# Extra training splits: name -> (kind, sampler, generator stream). Each is drawn by its own
# generator, np.random.default_rng((corpus seed, stream)), after the tokenizer is trained and
# without adding to its text, so asking for one leaves every other split, every held-out set and
# the tokenizer byte-identical (issue 29, arm 7).
EXTRA_SPLITS = {
  'tts_asr_qa': ('tts_asr', qa_sample, 2901),
  'duplex_barge_in': ('duplex', functools.partial(duplex_sample, timing=BARGE_IN_RICH), 2902),
  'duplex_quick_stop': ('duplex', functools.partial(duplex_sample, timing=QUICK_STOP), 2903),
  'duplex_paused_quick_stop': (
    'duplex',
    functools.partial(duplex_sample, timing=PAUSED_QUICK_STOP),
    2904,
  ),
  'duplex_direction_pause': (
    'duplex',
    functools.partial(duplex_sample, timing=DIRECTION_PAUSE),
    2905,
  ),
  # more conversations like the 'duplex' split's, from a generator of their own
  'duplex_more': ('duplex', functools.partial(duplex_sample, timing=TRAINING), 2906),
}


def _write(
  out_dir: str, name: str, kind: str, tracks: list[_Track], write_audio: bool, codec: ToyCodec
) -> str:
  os.makedirs(os.path.join(out_dir, 'codes'), exist_ok=True)
  path = os.path.join(out_dir, f'{name}.jsonl')
  with open(path, 'w') as f:
    for n, track in enumerate(tracks):
      sid = f'{name}_{n:05d}'
      line = {'id': sid, 'kind': kind, 'sample_rate': SAMPLE_RATE}
      codes = track.codes()
      if write_audio:
        import soundfile

        wave = np.stack([codec.decode(c) for c in codes.values()], axis=1)  # [S, C]
        line['audio'] = f'codes/{sid}.wav'
        soundfile.write(os.path.join(out_dir, line['audio']), wave, SAMPLE_RATE, subtype='FLOAT')
      else:
        line['codes'] = {}
        for s, c in codes.items():
          line['codes'][s] = f'codes/{sid}_{s}.npy'
          np.save(os.path.join(out_dir, line['codes'][s]), c.astype(np.int16))
      line['segments'] = track.segments
      events = events_from_segments(track.segments, track.frames)  # in frames
      if events:
        line['events'] = [list(e) for e in events]
      f.write(json.dumps(line) + '\n')
  return path


def generate(
  out_dir: str,
  *,
  seed: int = 0,
  num_tts_asr: int = 400,
  num_duplex: int = 400,
  num_heldout: int = 64,
  write_audio: bool = False,
  vocab_size: int = 200,
  timing: Timing = TRAINING,
  variants: bool = True,
  extras: dict[str, int] | None = None,
) -> dict:
  """Writes the corpus (manifests, codes, tokenizer.model) under out_dir; returns their paths.
  `timing`: the training and standard held-out conversations' ranges; `variants`: also the
  held-out sets of HELDOUT_VARIANTS (num_heldout each, their own timing and generator seed);
  `extras`: {name in EXTRA_SPLITS: samples}, extra training splits (none by default)."""
  for name in extras or {}:
    if name not in EXTRA_SPLITS:
      raise ValueError(f'synthetic corpus: no extra split {name!r}; there are {list(EXTRA_SPLITS)}')
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  speech, codec = ToySpeech(), ToyCodec()
  make = {
    'tts_asr': tts_asr_sample,
    'duplex': lambda speech, rng: duplex_sample(speech, rng, timing=timing),
  }
  splits = {
    'tts_asr': ('tts_asr', num_tts_asr),
    'duplex': ('duplex', num_duplex),
    'heldout_tts_asr': ('tts_asr', num_heldout),
    'heldout_duplex': ('duplex', num_heldout),
  }
  splits = {
    name: (kind, [make[kind](speech, rng) for _ in range(n)]) for name, (kind, n) in splits.items()
  }
  for name, (variant, offset) in HELDOUT_VARIANTS.items() if variants else ():
    own = np.random.default_rng((seed + offset, 29))  # independent of the splits above
    splits[name] = (
      'duplex',
      [duplex_sample(speech, own, timing=variant) for _ in range(num_heldout)],
    )
  # the tokenizer learns from the training splits only (plus every word once, for coverage)
  texts = [' '.join(WORDS)] + [
    s['text']
    for name, (_, tracks) in splits.items()
    if not name.startswith('heldout')
    for t in tracks
    for s in t.segments
  ]
  paths = {'out_dir': out_dir, 'tokenizer': os.path.join(out_dir, 'tokenizer.model')}
  tok = train_sentencepiece(texts, paths['tokenizer'], vocab_size)
  if tok.vocab_size > MAX_TEXT_ID:
    raise ValueError(
      f'synthetic tokenizer has {tok.vocab_size} ids; the tiny config allows {MAX_TEXT_ID}'
    )
  for name, n in (extras or {}).items():
    kind, sample, stream = EXTRA_SPLITS[name]
    own = np.random.default_rng((seed, stream))
    splits[name] = (kind, [sample(speech, own) for _ in range(n)])
  for name, (kind, tracks) in splits.items():
    paths[name] = _write(out_dir, name, kind, tracks, write_audio, codec)
  return paths
