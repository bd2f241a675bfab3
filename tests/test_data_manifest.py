"""Manifest validation and `prepare`: every handled bad input has a clear message naming the
file and line, and `prepare` counts what it skips."""

import json
import re

import numpy as np
import pytest
import soundfile

from flmjax import cli
from flmjax.codec.toy import ToyCodec
from flmjax.data.manifest import ManifestError
from flmjax.data.prepare import prepare
from flmjax.data.records import read_all
from flmjax.data.tokenizer import train_sentencepiece


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return train_sentencepiece(['what is two plus three', 'it is five', 'hello there'] * 5, path, 60)


def seg(speaker='model', start=0.0, end=0.8, text='it is five'):
  return {'speaker': speaker, 'start': start, 'end': end, 'text': text}


def good_codes(tmp_path, name='c', frames=20, n_codebooks=8):
  path = tmp_path / f'{name}.npy'
  np.save(path, np.random.default_rng(0).integers(0, 2048, (n_codebooks, frames)))
  return path.name


def tts(tmp_path, **over):
  line = {
    'id': 'x',
    'kind': 'tts_asr',
    'sample_rate': 24000,
    'codes': {'model': good_codes(tmp_path)},
    'segments': [seg()],
  }
  line.update(over)
  return line


def run(tmp_path, tok, lines, codec=None):
  """Prepares `lines` strictly; returns the ManifestError raised."""
  path = tmp_path / 'm.jsonl'
  path.write_text('\n'.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n')
  with pytest.raises(ManifestError) as e:
    prepare(str(path), str(tmp_path / 'out'), tok, codec=codec, strict=True, progress=False)
  return str(e.value), e.value.reason


def test_valid_line_round_trips(tmp_path, tok):
  path = tmp_path / 'm.jsonl'
  segments = [seg(start=0.08, end=0.8), seg(start=0.8, end=1.2, text='hello there')]
  path.write_text(json.dumps(tts(tmp_path, segments=segments)) + '\n')
  summary = prepare(str(path), str(tmp_path / 'out'), tok, strict=True, progress=False)
  assert summary['num_records'] == 1 and summary['num_skipped'] == 0
  (r,) = read_all(tmp_path / 'out')
  np.testing.assert_array_equal(r.codes['model'], np.load(tmp_path / 'c.npy'))
  assert r.sentences == [
    ('model', 1, 10, tok.encode('it is five')),
    ('model', 10, 15, tok.encode('hello there')),
  ]


@pytest.mark.parametrize(
  'line, message, reason',
  [
    ('{"id": "x", "kind": ', r'not valid JSON', 'bad_json'),
    ('[1, 2]', r'a line must be a JSON object', 'bad_json'),
    (
      {'id': 'x', 'kind': 'duplex', 'codes': {}},
      r"missing field\(s\) \['segments'\]",
      'missing_field',
    ),
    (
      {'id': 'x', 'kind': 'tts_asr', 'segments': [seg()]},
      'give exactly one of "audio"',
      'missing_field',
    ),
    (
      {'id': 'x', 'kind': 'monologue', 'segments': [seg()], 'codes': {'model': 'c.npy'}},
      'field "kind" is \'monologue\'',
      'bad_field',
    ),
    (
      {'id': 'x', 'kind': 'tts_asr', 'audio': 'a.wav', 'segments': [seg()]},
      r"missing field\(s\) \['sample_rate'\]",
      'missing_field',
    ),
  ],
)
def test_bad_lines(tmp_path, tok, line, message, reason):
  got, why = run(tmp_path, tok, [tts(tmp_path), line])  # the bad line is line 2
  assert why == reason
  assert re.search(r'm.jsonl:2: ' + message, got), got


@pytest.mark.parametrize(
  'segments, message, reason',
  [
    (
      [{'speaker': 'model', 'start': 0, 'end': 1}],
      r"segment 0: missing field\(s\) \['text'\]",
      'missing_field',
    ),
    ([seg(text='  ')], 'segment 0: empty text', 'empty_text'),
    ([seg(speaker='bot')], "segment 0: speaker 'bot' is not one of", 'bad_field'),
    (
      [seg(start=1.0, end=0.5)],
      r'segment 0: reversed or empty: start 1.0 s, end 0.5 s',
      'bad_segment',
    ),
    (
      [seg(), seg(start=1.0, end=2.0)],
      r'segment 1: \[1.0, 2.0\] s lies outside the audio '
      r'\(0 to 1.60 s\)',
      'bad_segment',
    ),
    ([seg(start=-0.5, end=0.5)], 'segment 0: .* lies outside the audio', 'bad_segment'),
    (
      [seg(start=0.0, end=0.8), seg(start=0.4, end=1.2)],
      r"segments 0 and 1 of speaker 'model' overlap \(0.4 s < 0.8 s\)",
      'bad_segment',
    ),
    (
      [seg(), seg(speaker='user', start=0.8, end=1.2)],
      'a tts_asr sample has one speaker',
      'bad_field',
    ),
  ],
)
def test_bad_segments(tmp_path, tok, segments, message, reason):
  got, why = run(tmp_path, tok, [tts(tmp_path, segments=segments)])
  assert why == reason
  assert re.search(r'm.jsonl:1: ' + message, got), got


def test_bad_codes(tmp_path, tok):
  bad = np.random.default_rng(0).integers(0, 2048, (8, 20))
  bad[5, 7] = 2048
  np.save(tmp_path / 'bad.npy', bad)
  got, why = run(tmp_path, tok, [tts(tmp_path, codes={'model': 'bad.npy'})])
  assert why == 'bad_codes' and 'm.jsonl:1: codes' in got and 'hold 2048, outside 0..2047' in got
  np.save(tmp_path / 'few.npy', bad[:4])
  got, _ = run(tmp_path, tok, [tts(tmp_path, codes={'model': 'few.npy'})])
  assert 'have shape (4, 20): 4 codebooks, but the line has "num_codebooks": 8 (default 8)' in got
  np.save(tmp_path / 'float.npy', bad.astype(np.float32))
  got, _ = run(tmp_path, tok, [tts(tmp_path, codes={'model': 'float.npy'})])
  assert 'have dtype float32; need integers' in got
  (tmp_path / 'junk.npy').write_bytes(b'not numpy')
  got, why = run(tmp_path, tok, [tts(tmp_path, codes={'model': 'junk.npy'})])
  assert (
    why == 'unreadable'
    and 'm.jsonl:1: cannot read codes' in got
    and 'junk.npy: not a readable .npy file' in got
  )
  got, why = run(tmp_path, tok, [tts(tmp_path, codes={'model': 'absent.npy'})])
  assert why == 'unreadable' and 'absent.npy' in got


def test_duplex_codes(tmp_path, tok):
  line = {
    'id': 'd',
    'kind': 'duplex',
    'codes': {'model': good_codes(tmp_path, 'm', 20)},
    'segments': [seg()],
  }
  got, _ = run(tmp_path, tok, [line])
  assert "m.jsonl:1: codes for speaker 'user' are missing" in got
  line['codes']['user'] = good_codes(tmp_path, 'u', 18)
  got, _ = run(tmp_path, tok, [line])
  assert "speakers have different numbers of frames: {'model': 20, 'user': 18}" in got


def test_bad_audio(tmp_path, tok):
  codec = ToyCodec()
  wave = codec.decode(np.random.default_rng(0).integers(0, 2048, (8, 10)))
  soundfile.write(tmp_path / 'mono16k.wav', wave, 16000)
  soundfile.write(tmp_path / 'mono.wav', wave, 24000)
  (tmp_path / 'corrupt.wav').write_bytes(b'RIFF\x00\x00garbage')
  line = lambda audio, kind='tts_asr': {
    'id': 'a',
    'kind': kind,
    'sample_rate': 24000,
    'audio': audio,
    'segments': [seg()],
  }
  got, why = run(tmp_path, tok, [line('corrupt.wav')], codec)
  assert why == 'unreadable' and 'corrupt.wav: not a readable audio file' in got
  assert got.startswith(str(tmp_path / 'm.jsonl') + ':1: ')
  got, why = run(tmp_path, tok, [line('missing.wav')], codec)
  assert why == 'unreadable' and 'missing.wav' in got
  got, why = run(tmp_path, tok, [line('mono16k.wav')], codec)
  assert why == 'bad_audio_format'
  assert 'mono16k.wav: sample rate 16000 Hz, but the manifest says 24000 Hz' in got
  got, why = run(tmp_path, tok, [line('mono.wav', 'duplex')], codec)
  assert why == 'bad_audio_format' and 'mono.wav: 1 channel(s); expected 2' in got
  got, why = run(tmp_path, tok, [line('mono.wav')], None)
  assert why == 'no_codec' and 'audio needs a codec' in got


def test_prepare_skips_and_counts(tmp_path, tok, capsys):
  lines = [tts(tmp_path), '{oops', tts(tmp_path, segments=[seg(text='')]), tts(tmp_path, id='y')]
  path = tmp_path / 'm.jsonl'
  path.write_text('\n'.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n')
  assert (
    cli.main(
      [
        'data',
        'prepare',
        str(path),
        str(tmp_path / 'out'),
        '--tokenizer',
        tok.path,
        '--no-progress',
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert 'prepared 2 samples' in printed
  assert "skipped 2: {'bad_json': 1, 'empty_text': 1}" in printed
  assert 'm.jsonl:2: not valid JSON' in printed and 'm.jsonl:3: segment 0: empty text' in printed
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['num_records'] == 2 and summary['num_skipped'] == 2
  assert [r.id for r in read_all(tmp_path / 'out')] == ['x', 'y']
  # --strict stops at the first bad line with exit code 1 and the message
  assert (
    cli.main(
      [
        'data',
        'prepare',
        str(path),
        str(tmp_path / 'out2'),
        '--tokenizer',
        tok.path,
        '--no-progress',
        '--strict',
      ]
    )
    == 1
  )
  assert 'm.jsonl:2: not valid JSON' in capsys.readouterr().err


def test_prepare_reports_monologue_pushes_and_cuts(tmp_path, tok):
  line = tts(
    tmp_path,
    segments=[
      seg(start=0.0, end=0.16, text='what is two plus three'),
      seg(start=0.16, end=1.6, text='it is five'),
    ],
  )  # frames 0-2, 2-20
  path = tmp_path / 'm.jsonl'
  path.write_text(json.dumps(line) + '\n')
  summary = prepare(str(path), str(tmp_path / 'out'), tok, strict=True, progress=False)
  n1, n2 = len(tok.encode('what is two plus three')), len(tok.encode('it is five'))
  assert n1 > 2
  # lead: the first text covers frames 0..n1-1, so the second (wanting frame 2) is pushed n1 - 2;
  # trail: the second starts at frame 20, past the sample's 20 frames: all n2 tokens are cut.
  assert summary['monologue_at_offset_0'] == {
    'lead': {'pushed_frames': n1 - 2, 'cut_tokens': 0},
    'trail': {'pushed_frames': 0, 'cut_tokens': n2},
  }
