"""Bad-input probes of `flmjax data prepare` and `flmjax data synth` (issue 13 §2, issue 22):
each bad input gets one stderr line naming the file (and line or flag) and what to do, exit
status 1; nothing a user has is damaged, and nothing wrong is accepted silently."""

import json
import os

import numpy as np
import pytest
import soundfile
from probe import codes_file, error_line, run, tts_line, write_manifest

from flmjax.codec.toy import ToyCodec
from flmjax.data.records import read_all
from flmjax.data.tokenizer import train_sentencepiece


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return train_sentencepiece(['what is two plus three', 'it is five', 'hello there'] * 5, path, 60)


def prepare(capsys, tok, manifest, out, *flags):
  return run(
    capsys, 'data', 'prepare', manifest, out, '--tokenizer', tok.path, '--no-progress', *flags
  )


def prepare_error(capsys, tok, manifest, out, *flags):
  return error_line(
    capsys, 'data', 'prepare', manifest, out, '--tokenizer', tok.path, '--no-progress', *flags
  )


# ---- data prepare: one bad line under --strict -------------------------------------------------


def _bad_npy(tmp_path, kind):
  if kind == 'transposed':
    return codes_file(tmp_path / 't.npy', (40, 8))
  if kind == 'empty':
    return codes_file(tmp_path / 'e.npy', (8, 0))
  if kind == 'truncated':
    np.save(tmp_path / 'full.npy', np.zeros((8, 20), np.int64))
    (tmp_path / 'trunc.npy').write_bytes((tmp_path / 'full.npy').read_bytes()[:200])
    return 'trunc.npy'
  if kind == 'too_high':
    return codes_file(tmp_path / 'h.npy', (8, 20), high=4000)
  if kind == 'float':
    np.save(tmp_path / 'f.npy', np.zeros((8, 20), np.float32))
    return 'f.npy'
  return 'absent.npy'


@pytest.mark.parametrize(
  'kind, message',
  [
    (
      'transposed',
      "t.npy' have shape (40, 8), which looks transposed ([frames, codebooks]); save "
      'them as [codebooks, frames] (codes.T)',
    ),
    ('empty', "e.npy' have 0 frames (shape (8, 0)); drop the sample or re-encode its audio"),
    ('truncated', 'trunc.npy: not a readable .npy file (truncated or another format'),
    ('too_high', 'outside 0..2047'),
    ('float', 'have dtype float32; need integers'),
    ('missing', 'absent.npy: no such file'),
  ],
  ids=['transposed', 'empty', 'truncated', 'too_high', 'float', 'missing'],
)
def test_prepare_bad_codes(capsys, tmp_path, tok, kind, message):
  manifest = write_manifest(tmp_path / 'm.jsonl', [tts_line(_bad_npy(tmp_path, kind))])
  line = prepare_error(capsys, tok, manifest, tmp_path / 'out', '--strict')
  assert f'{manifest}:1: ' in line and message in line
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
  'shape, extra, message',
  [
    (
      (20, 8),
      {},
      'have shape (20, 8), which looks transposed ([frames, codebooks]); save them as '
      '[codebooks, frames] (codes.T)',
    ),
    (
      (32, 40),
      {},
      'have shape (32, 40): 32 codebooks, but the line has "num_codebooks": 8 '
      '(default 8); a dump of 32 codebooks declares "num_codebooks": 32 on its line',
    ),
    (
      (8, 40),
      {'num_codebooks': 32},
      'have shape (8, 40): 8 codebooks, but the line has "num_codebooks": 32',
    ),
    ((8, 40), {'num_codebooks': 64}, 'field "num_codebooks" is 64; need an integer in 8..32'),
    ((8, 40), {'num_codebooks': '8'}, 'field "num_codebooks" is \'8\'; need an integer'),
  ],
  ids=['short_transposed', 'undeclared_32', 'declared_32_got_8', 'declared_64', 'declared_str'],
)
def test_prepare_codebook_count(capsys, tmp_path, tok, shape, extra, message):
  line = {**tts_line(codes_file(tmp_path / 'c.npy', shape)), **extra}
  manifest = write_manifest(tmp_path / 'm.jsonl', [line])
  got = prepare_error(capsys, tok, manifest, tmp_path / 'out', '--strict')
  assert f'{manifest}:1: ' in got and message in got, got


def test_prepare_full_mimi_dump_declared(capsys, tmp_path, tok):
  codes = codes_file(tmp_path / 'c.npy', (32, 20))
  manifest = write_manifest(tmp_path / 'm.jsonl', [{**tts_line(codes), 'num_codebooks': 32}])
  rc, _, err = prepare(capsys, tok, manifest, tmp_path / 'out', '--strict')
  assert rc == 0, err
  (record,) = read_all(tmp_path / 'out')
  np.testing.assert_array_equal(record.codes['model'], np.load(tmp_path / 'c.npy')[:8])


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('codes', {'model': 5}, "field \"codes\" must map speakers ['model', 'user'] to .npy paths"),
    ('text', 5, 'segment 0: text must be a string, got 5'),
    ('start', '0', "segment 0: start and end must be finite numbers (seconds), got '0' and 0.8"),
    ('start', True, 'segment 0: start and end must be finite numbers (seconds), got True'),
    (
      'end',
      float('inf'),
      'segment 0: start and end must be finite numbers (seconds), got 0.0 and inf',
    ),
  ],
  ids=['codes_not_paths', 'text_not_str', 'start_str', 'start_bool', 'end_inf'],
)
def test_prepare_bad_field_types(capsys, tmp_path, tok, field, value, message):
  line = tts_line(codes_file(tmp_path / 'c.npy'))
  if field == 'codes':
    line['codes'] = value
  else:
    line['segments'][0][field] = value
  manifest = write_manifest(tmp_path / 'm.jsonl', [line])
  assert f'{manifest}:1: {message}' in prepare_error(
    capsys, tok, manifest, tmp_path / 'o', '--strict'
  )


def test_prepare_non_utf8_line_is_named_and_skipped(capsys, tmp_path, tok):
  good = json.dumps(tts_line(codes_file(tmp_path / 'c.npy'))).encode()
  bad = json.dumps(tts_line('c.npy', id='y', text='caf\u00e9')).encode()
  bad = bad.replace(b'\\u00e9', b'\xe9')  # Latin-1, not UTF-8
  (tmp_path / 'm.jsonl').write_bytes(good + b'\n' + bad + b'\n')
  manifest = str(tmp_path / 'm.jsonl')
  rc, out, _ = prepare(capsys, tok, manifest, tmp_path / 'out')
  assert rc == 0 and f'{manifest}:2: not UTF-8 text (byte 0xe9 at column' in out
  assert "'not_utf8': 1" in out and [r.id for r in read_all(tmp_path / 'out')] == ['x']
  line = prepare_error(capsys, tok, manifest, tmp_path / 'out2', '--strict')
  assert f'{manifest}:2: not UTF-8 text' in line and 'save the manifest as UTF-8' in line


@pytest.mark.parametrize(
  'content, message',
  [
    ('', 'the manifest is empty: one JSON object per line'),
    ('\n  \n', 'the manifest is empty'),
    ('{oops\n[1]\n', "no usable samples: all 2 line(s) were rejected {'bad_json': 2}; first: "),
  ],
  ids=['empty', 'blank_lines', 'all_lines_bad'],
)
def test_prepare_empty_or_useless_manifest(capsys, tmp_path, tok, content, message):
  (tmp_path / 'm.jsonl').write_text(content)
  line = prepare_error(capsys, tok, tmp_path / 'm.jsonl', tmp_path / 'out')
  assert str(tmp_path / 'm.jsonl') in line and message in line
  assert not (tmp_path / 'out').exists() and os.listdir(tmp_path) == ['m.jsonl']


def test_prepare_never_damages_an_existing_dataset(capsys, tmp_path, tok):
  codes = codes_file(tmp_path / 'c.npy')
  good = write_manifest(tmp_path / 'good.jsonl', [tts_line(codes, id=f'g{i}') for i in range(3)])
  out = tmp_path / 'data' / 'prepared'
  assert prepare(capsys, tok, good, out)[0] == 0
  before = {p: (out / p).read_bytes() for p in os.listdir(out)}
  # The probe that destroyed data: --strict into an existing dataset, failing on line 2.
  bad = write_manifest(tmp_path / 'bad.jsonl', [tts_line(codes), '{oops'])
  line = prepare_error(capsys, tok, bad, out, '--strict')
  assert 'already holds a prepared dataset; pass --overwrite to replace it' in line
  line = prepare_error(capsys, tok, bad, out, '--strict', '--overwrite')
  assert f'{bad}:2: not valid JSON' in line
  assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before  # intact
  assert os.listdir(tmp_path / 'data') == ['prepared']  # no partial or temporary output
  # --overwrite that succeeds replaces it whole.
  assert (
    prepare(
      capsys, tok, write_manifest(tmp_path / 'one.jsonl', [tts_line(codes)]), out, '--overwrite'
    )[0]
    == 0
  )
  assert [r.id for r in read_all(out)] == ['x'] and os.listdir(tmp_path / 'data') == ['prepared']


def test_prepare_bad_out_dir_and_flags(capsys, tmp_path, tok):
  manifest = write_manifest(tmp_path / 'm.jsonl', [tts_line(codes_file(tmp_path / 'c.npy'))])
  (tmp_path / 'afile').write_text('keep me')
  line = prepare_error(capsys, tok, manifest, tmp_path / 'afile')
  assert 'OUT_DIR' in line and 'afile is a file; give a directory path' in line
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  line = prepare_error(capsys, tok, manifest, tmp_path / 'mine', '--overwrite')
  assert (
    'mine exists and is not a prepared dataset (no summary.json); choose a new directory' in line
  )
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
  assert (tmp_path / 'afile').read_text() == 'keep me'
  assert 'nope.jsonl: no such file' in prepare_error(
    capsys, tok, tmp_path / 'nope.jsonl', tmp_path / 'o'
  )
  assert 'mine: is a directory; give the .jsonl file' in prepare_error(
    capsys, tok, tmp_path / 'mine', tmp_path / 'o'
  )
  assert '--records-per-shard 0 must be >= 1' in prepare_error(
    capsys, tok, manifest, tmp_path / 'o', '--records-per-shard', '0'
  )
  assert 'tokenizer: no file at' in error_line(
    capsys, 'data', 'prepare', manifest, tmp_path / 'o', '--tokenizer', tmp_path / 'tok.model'
  )
  for name in ('bad.model', 'bad.json'):
    (tmp_path / name).write_text('garbage')
    assert f"bad.{name[4:]}' is not a readable" in error_line(
      capsys, 'data', 'prepare', manifest, tmp_path / 'o', '--tokenizer', tmp_path / name
    )
  assert 'the following arguments are required: --tokenizer' in error_line(
    capsys, 'data', 'prepare', manifest, tmp_path / 'o'
  )
  assert "invalid choice: 'mimix'" in prepare_error(
    capsys, tok, manifest, tmp_path / 'o', '--codec', 'mimix'
  )


def test_synth_bad_out_and_counts(capsys, tmp_path):
  (tmp_path / 'afile').write_text('keep me')
  assert 'OUT ' in error_line(capsys, 'data', 'synth', tmp_path / 'afile')
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  assert (
    'exists and is not a synthetic corpus (no tokenizer.model); choose a new directory'
    in error_line(capsys, 'data', 'synth', tmp_path / 'mine')
  )
  assert '--num-duplex -3 must be >= 1' in error_line(
    capsys, 'data', 'synth', tmp_path / 'new', '--num-duplex', '-3'
  )
  assert (
    (tmp_path / 'afile').read_text() == 'keep me'
    and os.listdir(tmp_path / 'mine') == ['notes.txt']
    and not (tmp_path / 'new').exists()
  )


def test_prepare_bad_audio(capsys, tmp_path, tok):
  codec = ToyCodec()
  wave = codec.decode(np.random.default_rng(0).integers(0, 2048, (8, 12)))
  soundfile.write(tmp_path / 'stereo.wav', np.stack([wave, wave], 1), 24000)
  (tmp_path / 'garbage.wav').write_bytes(b'RIFF\x10\x00\x00\x00WAVEjunkjunkjunk')
  soundfile.write(tmp_path / 'full.wav', wave, 24000)
  (tmp_path / 'cut.wav').write_bytes((tmp_path / 'full.wav').read_bytes()[:-5000])
  for name, message in (
    ('stereo.wav', 'stereo.wav: 2 channel(s); expected 1'),
    ('garbage.wav', 'garbage.wav: not a readable audio file'),
    (
      'cut.wav',
      f'cut.wav: truncated WAV: its header says {wave.size * 2} '
      f'bytes of audio, the file holds {wave.size * 2 - 5000}; '
      'copy or export the file again',
    ),
  ):
    line = {**tts_line(''), 'audio': name, 'sample_rate': 24000}
    del line['codes']
    manifest = write_manifest(tmp_path / 'm.jsonl', [line])
    got = prepare_error(capsys, tok, manifest, tmp_path / 'out', '--strict', '--codec', 'toy')
    assert f'{manifest}:1: ' in got and message in got
