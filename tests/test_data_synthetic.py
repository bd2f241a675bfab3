"""The embedded synthetic corpus, its tokenizer and the toy codec."""

import json
import os

import numpy as np
import pytest
import soundfile

from flmjax import cli
from flmjax.codec.toy import ToyCodec
from flmjax.data import manifest as mf
from flmjax.data import synthetic
from flmjax.data.monologue import layout_monologue
from flmjax.data.prepare import prepare
from flmjax.data.records import read_all
from flmjax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

N = synthetic.NUMBERS


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return synthetic.generate(
    str(tmp_path_factory.mktemp('syn')), seed=3, num_tts_asr=40, num_duplex=40, num_heldout=8
  )


def entries(path):
  out = list(mf.read_manifest(path))
  assert not [e for e in out if isinstance(e, mf.ManifestError)]
  return out


def test_generation_is_deterministic(corpus, tmp_path):
  again = synthetic.generate(
    str(tmp_path / 'a'), seed=3, num_tts_asr=40, num_duplex=40, num_heldout=8
  )
  for name in ('tts_asr', 'duplex', 'heldout_duplex', 'tokenizer'):
    with open(corpus[name], 'rb') as f, open(again[name], 'rb') as g:
      assert f.read() == g.read(), name
  e1, e2 = entries(corpus['duplex'])[5], entries(again['duplex'])[5]
  np.testing.assert_array_equal(np.load(e1.codes['user']), np.load(e2.codes['user']))
  other = synthetic.generate(
    str(tmp_path / 'b'), seed=4, num_tts_asr=4, num_duplex=4, num_heldout=1
  )
  assert open(other['duplex']).readline() != open(corpus['duplex']).readline()


def test_tokenizer_fits_tiny_and_round_trips(corpus):
  tok = load_tokenizer(corpus['tokenizer'])
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size <= synthetic.MAX_TEXT_ID
  for name in ('tts_asr', 'duplex', 'heldout_duplex', 'heldout_tts_asr'):
    for e in entries(corpus[name]):
      for s in e.segments:
        ids = tok.encode(s.text)
        assert ids and max(ids) < synthetic.MAX_TEXT_ID and 0 not in ids  # 0 is unk
        assert tok.decode(ids) == s.text
  # one token per word keeps every sentence's text shorter than its speech
  assert [len(tok.encode(w)) for w in synthetic.WORDS] == [1] * len(synthetic.WORDS)


def _answer(question: str) -> str:
  w = question.split()
  if w[1] == 'comes':
    return N[N.index(w[3]) + (1 if w[2] == 'after' else -1)]
  a, b = N.index(w[2]), N.index(w[4])
  return N[a + b if w[3] == 'plus' else a - b]


def _exchanges(segs):
  """A conversation's segments -> [(question segments, answer segment)]: a pause splits a question
  into consecutive user segments."""
  out, question = [], []
  for s in segs:
    if s.speaker == 'user':
      question.append(s)
    else:
      out.append((question, s))
      question = []
  assert not question, 'every question is answered'
  return out


def test_duplex_answers_need_the_question_audio(corpus):
  silence = synthetic.silence_code()
  by_question, styles = {}, {'pause': 0, 'barge_in': 0}
  for e in entries(corpus['duplex']):
    codes = {s: np.load(p) for s, p in e.codes.items()}
    assert all(c.min() >= 0 and c.max() < 2048 for c in codes.values())
    exchanges = _exchanges(e.segments)
    assert 2 <= len(exchanges) <= 5
    for n, (parts, a) in enumerate(exchanges):
      q = ' '.join(p.text for p in parts)
      full = f'it is {_answer(q)}'
      nxt = exchanges[n + 1][0][0].start_frame if n + 1 < len(exchanges) else None
      timing = synthetic.TRAINING
      if nxt is not None and nxt < a.end_frame:  # barged in on: stops 1-2 frames after the onset
        styles['barge_in'] += 1
        assert a.end_frame - nxt in (1, 2) and a.start_frame < nxt
        assert full.startswith(a.text) and a.text
        assert (codes['model'][0, a.end_frame : exchanges[n + 1][0][-1].end_frame] == silence).all()
      else:
        assert a.text == full
      gap = a.start_frame - parts[-1].end_frame  # the model answers after a short gap
      assert timing.answer_gap[0] <= gap <= timing.answer_gap[1]
      for p, later in zip(parts, parts[1:]):  # a pause inside the question: the model waits
        styles['pause'] += 1
        assert timing.pause_frames[0] <= later.start_frame - p.end_frame <= timing.pause_frames[1]
        assert (codes['model'][0, p.end_frame : later.start_frame] == silence).all()
      # the model is silent while the user asks (a cut answer ends within 2 frames of the onset):
      # the answer's only source is the listen stream
      for p in parts:
        assert (codes['model'][0, p.start_frame + 2 : p.end_frame] == silence).all()
      user_sem = np.concatenate([codes['user'][0, p.start_frame : p.end_frame] for p in parts])
      runs = user_sem[np.r_[True, user_sem[1:] != user_sem[:-1]]]  # one code per run: any rate
      by_question.setdefault(q, set()).add(runs.tobytes())
  assert min(styles.values()) >= 5, styles
  # one question -> one semantic sequence (any voice and rate); different questions differ
  assert all(len(v) == 1 for v in by_question.values())
  sems = [next(iter(v)) for v in by_question.values()]
  assert len(set(sems)) == len(sems) > 20


def test_duplex_events_are_the_timeline(corpus):
  """The generator writes the events its segments imply (flmjax.data.events, one derivation for
  the corpus and for evaluation), and the reference model's activity scores perfectly on them."""
  from flmjax.eval import events_from_segments, speech_activity, turn_taking

  counts = dict.fromkeys(('turn_end', 'pause', 'interrupt'), 0)
  for name in ('duplex', 'heldout_duplex', *synthetic.HELDOUT_VARIANTS):
    for line in map(json.loads, open(corpus[name])):
      model = np.load(os.path.join(corpus['out_dir'], line['codes']['model']))
      events = [tuple(e) for e in line['events']]
      assert events == events_from_segments(line['segments'], model.shape[1])
      m = turn_taking(speech_activity(model), events)
      assert m['takeover_rate'] == 1.0
      assert m['pause_takeover_rate'] in (None, 0.0) and m['interrupt_stop_rate'] in (None, 1.0)
      timing = synthetic.HELDOUT_VARIANTS.get(name, (synthetic.TRAINING,))[0]
      low, high = (80 * g for g in timing.answer_gap)
      assert all(low <= x <= high for x in m['response_latency_ms_all'])  # the answer gap
      for k, v in m['counts'].items():
        counts[k] += v
  assert min(counts.values()) >= 5, counts


def test_acoustic_codes_depend_on_speaker_and_noise():
  speech = synthetic.ToySpeech()
  rng = np.random.default_rng(0)
  a0, a0b, a1 = (speech.speak('what is two', s, rng) for s in (0, 0, 1))
  np.testing.assert_array_equal(a0[0], a1[0])  # semantic: the word alone
  assert not np.array_equal(a0[1:], a0b[1:])  # noise
  assert np.abs((a0[1:] - a0b[1:] + 1024) % 2048 - 1024).max() <= 6  # ... but small
  assert np.abs((a0[1:] - a1[1:] + 1024) % 2048 - 1024).mean() > 50  # voice


def test_tts_asr_is_trimmed_so_trailing_text_runs_past_the_audio(corpus):
  """Like trimmed real utterances, many end right after their last word: a trailing monologue
  then runs past the audio (the loader extends those samples)."""
  tok = load_tokenizer(corpus['tokenizer'])
  past = []
  for e in entries(corpus['tts_asr']):
    frames = np.load(e.codes['model']).shape[1]
    assert frames - e.segments[-1].end_frame in (0, 1, 2)
    sents = [(s.start_frame, s.end_frame, tok.encode(s.text)) for s in e.segments]
    past.append(layout_monologue(sents, frames, 'trail', 0, 317)[2] > 0)
  assert sum(past) >= 0.8 * len(past)  # all but some one-word fillers


def test_audio_manifest_matches_codes_manifest(tmp_path):
  """ToyCodec wavs (stereo for duplex, one at 16 kHz) prepare to the same records as .npy codes."""
  kw = dict(seed=7, num_tts_asr=3, num_duplex=3, num_heldout=1)
  codes = synthetic.generate(str(tmp_path / 'codes'), **kw)
  audio = synthetic.generate(str(tmp_path / 'audio'), write_audio=True, **kw)
  tok = load_tokenizer(codes['tokenizer'])
  # resample one duplex file to 16 kHz and say so in the manifest
  lines = [json.loads(x) for x in open(audio['duplex'])]
  wav = os.path.join(audio['out_dir'], lines[0]['audio'])
  import soxr

  wave, rate = soundfile.read(wav, dtype='float32')
  soundfile.write(wav, soxr.resample(wave, rate, 16000), 16000, subtype='FLOAT')
  lines[0]['sample_rate'] = 16000
  with open(audio['duplex'], 'w') as f:
    f.writelines(json.dumps(x) + '\n' for x in lines)
  for name in ('tts_asr', 'duplex'):
    prepare(codes[name], str(tmp_path / f'c_{name}'), tok, strict=True, progress=False)
    prepare(
      audio[name], str(tmp_path / f'a_{name}'), tok, codec=ToyCodec(), strict=True, progress=False
    )
    for rc, ra in zip(read_all(tmp_path / f'c_{name}'), read_all(tmp_path / f'a_{name}')):
      assert rc.sentences == ra.sentences and rc.codes.keys() == ra.codes.keys()
      for s in rc.codes:
        np.testing.assert_array_equal(rc.codes[s], ra.codes[s])


def test_toy_codec_round_trip():
  codec = ToyCodec()
  codes = np.random.default_rng(1).integers(0, 2048, (8, 12))
  wave = codec.decode(codes)
  assert wave.shape == (12 * 1920,) and np.abs(wave).max() < 1
  np.testing.assert_array_equal(codec.encode(wave), codes)
  np.testing.assert_array_equal(codec.encode(wave[:-5]), codes[:, :11])  # partial frame dropped
  with pytest.raises(ValueError, match=r'codes must be \[8, frames\]'):
    codec.decode(codes[:3])
  with pytest.raises(ValueError, match='wave must be mono'):
    codec.encode(np.zeros((2, 1920)))


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    ['what is two plus three', 'it is five'] * 10,
    trainers.BpeTrainer(
      vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  tok.save(str(tmp_path / 'tokenizer.json'))
  hf = load_tokenizer(tmp_path / 'tokenizer.json')
  assert isinstance(hf, HFTokenizer) and hf.vocab_size == tok.get_vocab_size()
  assert hf.decode(hf.encode('it is two')) == 'it is two'
  with pytest.raises(FileNotFoundError, match='no file at'):
    load_tokenizer(tmp_path / 'absent.model')
  (tmp_path / 'vocab.txt').write_text('x')
  with pytest.raises(ValueError, match='neither a SentencePiece .model nor a tokenizer.json'):
    load_tokenizer(tmp_path / 'vocab.txt')


def test_cli_synth(tmp_path, capsys):
  args = ['--num-tts-asr', '2', '--num-duplex', '3', '--num-heldout', '2']
  assert cli.main(['data', 'synth', str(tmp_path / 'a')] + args) == 0
  assert f'duplex: {tmp_path / "a" / "duplex.jsonl"}' in capsys.readouterr().out
  assert len(open(tmp_path / 'a' / 'duplex.jsonl').readlines()) == 3
  # deterministic: a second run writes the same bytes, codes and events included
  assert cli.main(['data', 'synth', str(tmp_path / 'b')] + args) == 0
  files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*') if p.is_file())
  assert len(files) > 10
  for rel in files:
    assert (tmp_path / 'a' / rel).read_bytes() == (tmp_path / 'b' / rel).read_bytes(), rel


def test_timing_ranges_shape_the_held_out_sets(corpus):
  """Long pauses are 8-15 frames and split every question; the slow set's user words last twice
  their frames; each set is drawn from its own seed (not the training draws)."""
  speech = synthetic.ToySpeech()
  pauses = [
    e[2] - e[1]
    for line in map(json.loads, open(corpus['heldout_long_pauses']))
    for e in line['events']
    if e[0] == 'pause'
  ]
  turns = sum(
    e[0] == 'turn_end'
    for line in map(json.loads, open(corpus['heldout_long_pauses']))
    for e in line['events']
  )
  assert pauses and min(pauses) >= 8 and max(pauses) <= 15 and len(pauses) == turns
  for name, factor in (('heldout_slow', 2), ('heldout_duplex', None)):
    ratios = []
    for line in map(json.loads, open(corpus[name])):
      for seg in line['segments']:
        if seg['speaker'] == 'user':
          base = sum(int(speech.lengths[speech.index[w]]) for w in seg['text'].split())
          ratios.append(round((seg['end'] - seg['start']) * 12.5) / base)
    if factor:
      assert set(ratios) == {2.0}
    else:
      assert min(ratios) >= 1.0 and max(ratios) <= 2.0 and len(set(ratios)) > 3
  # a rate of 2 repeats every frame of a word
  track = synthetic._Track(speech, {'user': 1}, np.random.default_rng(0))
  track.say('user', 'what comes after nine', rate=2.0)
  units = track.units['user']
  assert units[::2] == units[1::2] and len(units) == 2 * len(
    speech.speak('what comes after nine', 1, np.random.default_rng(0))[0]
  )
  with pytest.raises(ValueError, match='pause_frames'):
    synthetic.Timing(pause_frames=(5, 3))
  with pytest.raises(ValueError, match=r'split_after=\(4,\): a question has 4 words'):
    synthetic.Timing(split_after=(4,))


def test_corpus_build_is_idempotent_per_timing(tmp_path):
  """SyntheticCorpus builds once per (sizes, timing); another timing builds again; the held-out
  variants' manifests are there (raw, not prepared)."""
  import dataclasses

  from flmjax.data.corpus import HELDOUT_DUPLEX, SyntheticCorpus

  kw = dict(num_tts_asr=4, num_duplex=4, num_heldout=2)
  corpus = SyntheticCorpus(str(tmp_path / 'c'), **kw)
  corpus.build(log=lambda _: None)
  done = tmp_path / 'c' / 'corpus.json'
  stamp = os.path.getmtime(done)
  corpus.build(log=lambda _: None)
  assert os.path.getmtime(done) == stamp  # the same corpus: not made again
  for name in HELDOUT_DUPLEX:
    assert len(open(corpus.manifest(name)).readlines()) == 2
  with pytest.raises(ValueError, match="no manifest 'heldout_fast'"):
    corpus.manifest('heldout_fast')
  slow = dataclasses.replace(corpus, timing=synthetic.Timing(rate=(2.0, 2.0)))
  slow.build(log=lambda _: None)
  assert json.load(open(done))['args']['timing']['rate'] == [2.0, 2.0]


def test_extra_splits_leave_the_rest_of_the_corpus_byte_identical(tmp_path):
  """Asking for the extra training splits changes no other split, held-out set or the tokenizer;
  the question-and-answer monologues answer their question; the barge-in-rich conversations cut
  answers short far more often than the training default's."""
  kw = dict(seed=5, num_tts_asr=6, num_duplex=30, num_heldout=4)
  plain = synthetic.generate(str(tmp_path / 'plain'), **kw)
  extra = synthetic.generate(
    str(tmp_path / 'extra'), extras={'tts_asr_qa': 20, 'duplex_barge_in': 30}, **kw
  )
  assert set(extra) - set(plain) == {'tts_asr_qa', 'duplex_barge_in'}
  for root, _, files in os.walk(tmp_path / 'plain'):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), tmp_path / 'plain')
      with open(tmp_path / 'plain' / rel, 'rb') as a, open(tmp_path / 'extra' / rel, 'rb') as b:
        assert a.read() == b.read(), rel
  for e in entries(extra['tts_asr_qa']):
    (q, a) = [s.text.split() for s in e.segments]
    n = N.index(q[-1])
    assert q[:3] == ['what', 'comes', q[2]] and a == [
      'it',
      'is',
      N[n + 1 if q[2] == 'after' else n - 1],
    ]

  def barge_ins(path):  # the frames the model keeps speaking after each barge-in starts
    return [
      round((s.end - t.start) * synthetic.FRAME_RATE)
      for e in entries(path)
      for s, t in zip(e.segments, e.segments[1:])
      if s.speaker == 'model' and t.speaker == 'user' and t.start < s.end
    ]

  assert len(barge_ins(extra['duplex_barge_in'])) > 2 * len(barge_ins(extra['duplex']))
  assert set(barge_ins(extra['duplex_barge_in'])) == {1, 2}
  quick = synthetic.generate(str(tmp_path / 'quick'), extras={'duplex_quick_stop': 30}, **kw)
  assert set(barge_ins(quick['duplex_quick_stop'])) == {1}
  assert len(barge_ins(quick['duplex_quick_stop'])) > 2 * len(barge_ins(extra['duplex']))
  paused = synthetic.generate(
    str(tmp_path / 'paused'), extras={'duplex_paused_quick_stop': 30, 'duplex_quick_stop': 30}, **kw
  )
  with open(quick['duplex_quick_stop'], 'rb') as a, open(paused['duplex_quick_stop'], 'rb') as b:
    assert a.read() == b.read()  # each extra split draws from its own generator
  assert set(barge_ins(paused['duplex_paused_quick_stop'])) == {1}

  def halves(path):  # (questions, user segments): a question split by a pause is two segments
    user = [s.text for e in entries(path) for s in e.segments if s.speaker == 'user']
    return sum(t.startswith('what') for t in user), len(user)

  questions, segments = halves(paused['duplex_paused_quick_stop'])
  assert segments == 2 * questions  # every question is split by a pause
  questions, segments = halves(paused['duplex'])
  assert questions < segments < 2 * questions  # the training default splits some of them
  # issue 29, arm 15: the number comes a pause after 'after'/'before' in every question
  direction = synthetic.generate(
    str(tmp_path / 'direction'),
    extras={'duplex_quick_stop': 30, 'duplex_direction_pause': 30, 'duplex_more': 30},
    **kw,
  )
  for name in ('duplex_quick_stop', 'duplex', 'heldout_duplex', 'tokenizer'):
    with open(quick[name], 'rb') as a, open(direction[name], 'rb') as b:
      assert a.read() == b.read(), name
  pairs = 0
  for e in entries(direction['duplex_direction_pause']):
    user = [s for s in e.segments if s.speaker == 'user']
    assert len(user) % 2 == 0  # each question in two halves
    for first, rest in zip(user[::2], user[1::2]):
      assert first.text.split()[:2] == ['what', 'comes'] and len(first.text.split()) == 3
      assert first.text.split()[2] in ('after', 'before') and rest.text.split()[0] in N
      assert 3 <= round((rest.start - first.end) * synthetic.FRAME_RATE) <= 15
      pairs += 1
  assert pairs > 60
  questions, segments = halves(direction['duplex_more'])  # like 'duplex': some questions split
  assert questions < segments < 2 * questions
  texts = lambda path: [[s.text for s in e.segments] for e in entries(path)]
  assert texts(direction['duplex_more']) != texts(direction['duplex'])  # a generator of its own
  with pytest.raises(ValueError, match="no extra split 'tts_asr_qb'"):
    synthetic.generate(str(tmp_path / 'bad'), extras={'tts_asr_qb': 1}, **kw)
