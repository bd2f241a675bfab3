"""Bad-input probes of `flmjax data prepare` and `flmjax chat` (issue 13 §2): each bad input gets
one stderr line naming the file (and line or flag) and what to do, exit status 1; nothing a user
has is damaged, and nothing wrong is accepted silently."""
import json
import os

import numpy as np
import pytest
import soundfile

from flmjax.codec.toy import ToyCodec
from flmjax.data.records import read_all
from flmjax.data.tokenizer import train_sentencepiece
from probe import codes_file, error_line, run, tts_line, write_manifest


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return train_sentencepiece(['what is two plus three', 'it is five', 'hello there'] * 5, path, 60)


def prepare(capsys, tok, manifest, out, *flags):
  return run(capsys, 'data', 'prepare', manifest, out, '--tokenizer', tok.path, '--no-progress',
             *flags)


def prepare_error(capsys, tok, manifest, out, *flags):
  return error_line(capsys, 'data', 'prepare', manifest, out, '--tokenizer', tok.path,
                    '--no-progress', *flags)


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


@pytest.mark.parametrize('kind, message', [
    ('transposed', "t.npy' have shape (40, 8), which looks transposed ([frames, codebooks]); save "
                   'them as [codebooks, frames] (codes.T)'),
    ('empty', "e.npy' have 0 frames (shape (8, 0)); drop the sample or re-encode its audio"),
    ('truncated', 'trunc.npy: not a readable .npy file (truncated or another format'),
    ('too_high', 'outside 0..2047'),
    ('float', 'have dtype float32; need integers'),
    ('missing', 'absent.npy: no such file'),
], ids=['transposed', 'empty', 'truncated', 'too_high', 'float', 'missing'])
def test_prepare_bad_codes(capsys, tmp_path, tok, kind, message):
  manifest = write_manifest(tmp_path / 'm.jsonl', [tts_line(_bad_npy(tmp_path, kind))])
  line = prepare_error(capsys, tok, manifest, tmp_path / 'out', '--strict')
  assert f'{manifest}:1: ' in line and message in line
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('field, value, message', [
    ('codes', {'model': 5}, 'field "codes" must map speakers [\'model\', \'user\'] to .npy paths'),
    ('text', 5, 'segment 0: text must be a string, got 5'),
    ('start', '0', "segment 0: start and end must be finite numbers (seconds), got '0' and 0.8"),
    ('start', True, 'segment 0: start and end must be finite numbers (seconds), got True'),
    ('end', float('inf'), 'segment 0: start and end must be finite numbers (seconds), got 0.0 and '
                          'inf'),
], ids=['codes_not_paths', 'text_not_str', 'start_str', 'start_bool', 'end_inf'])
def test_prepare_bad_field_types(capsys, tmp_path, tok, field, value, message):
  line = tts_line(codes_file(tmp_path / 'c.npy'))
  if field == 'codes':
    line['codes'] = value
  else:
    line['segments'][0][field] = value
  manifest = write_manifest(tmp_path / 'm.jsonl', [line])
  assert f'{manifest}:1: {message}' in prepare_error(capsys, tok, manifest, tmp_path / 'o',
                                                     '--strict')


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


@pytest.mark.parametrize('content, message', [
    ('', 'the manifest is empty: one JSON object per line'),
    ('\n  \n', 'the manifest is empty'),
    ('{oops\n[1]\n', "no usable samples: all 2 line(s) were rejected {'bad_json': 2}; first: "),
], ids=['empty', 'blank_lines', 'all_lines_bad'])
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
  assert prepare(capsys, tok, write_manifest(tmp_path / 'one.jsonl', [tts_line(codes)]), out,
                 '--overwrite')[0] == 0
  assert [r.id for r in read_all(out)] == ['x'] and os.listdir(tmp_path / 'data') == ['prepared']


def test_prepare_bad_out_dir_and_flags(capsys, tmp_path, tok):
  manifest = write_manifest(tmp_path / 'm.jsonl', [tts_line(codes_file(tmp_path / 'c.npy'))])
  (tmp_path / 'afile').write_text('keep me')
  line = prepare_error(capsys, tok, manifest, tmp_path / 'afile')
  assert 'OUT_DIR' in line and 'afile is a file; give a directory path' in line
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  line = prepare_error(capsys, tok, manifest, tmp_path / 'mine', '--overwrite')
  assert 'mine exists and is not a prepared dataset (no summary.json); choose a new directory' \
      in line
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
  assert (tmp_path / 'afile').read_text() == 'keep me'
  assert 'nope.jsonl: no such file' in prepare_error(capsys, tok, tmp_path / 'nope.jsonl',
                                                    tmp_path / 'o')
  assert 'mine: is a directory; give the .jsonl file' in prepare_error(
      capsys, tok, tmp_path / 'mine', tmp_path / 'o')
  assert '--records-per-shard 0 must be >= 1' in prepare_error(
      capsys, tok, manifest, tmp_path / 'o', '--records-per-shard', '0')
  assert "tokenizer: no file at" in error_line(
      capsys, 'data', 'prepare', manifest, tmp_path / 'o', '--tokenizer', tmp_path / 'tok.model')
  for name in ('bad.model', 'bad.json'):
    (tmp_path / name).write_text('garbage')
    assert f"bad.{name[4:]}' is not a readable" in error_line(
        capsys, 'data', 'prepare', manifest, tmp_path / 'o', '--tokenizer', tmp_path / name)
  assert 'the following arguments are required: --tokenizer' in error_line(
      capsys, 'data', 'prepare', manifest, tmp_path / 'o')
  assert "invalid choice: 'mimix'" in prepare_error(capsys, tok, manifest, tmp_path / 'o',
                                                    '--codec', 'mimix')


def test_synth_bad_out_and_counts(capsys, tmp_path):
  (tmp_path / 'afile').write_text('keep me')
  assert 'OUT ' in error_line(capsys, 'data', 'synth', tmp_path / 'afile')
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  assert 'is a non-empty directory that holds no synthetic corpus; choose a new directory' in \
      error_line(capsys, 'data', 'synth', tmp_path / 'mine')
  assert '--num-duplex -3 must be >= 1' in error_line(capsys, 'data', 'synth', tmp_path / 'new',
                                                      '--num-duplex', '-3')
  assert (tmp_path / 'afile').read_text() == 'keep me' and os.listdir(tmp_path / 'mine') == [
      'notes.txt'] and not (tmp_path / 'new').exists()


def test_prepare_bad_audio(capsys, tmp_path, tok):
  codec = ToyCodec()
  wave = codec.decode(np.random.default_rng(0).integers(0, 2048, (8, 12)))
  soundfile.write(tmp_path / 'stereo.wav', np.stack([wave, wave], 1), 24000)
  (tmp_path / 'garbage.wav').write_bytes(b'RIFF\x10\x00\x00\x00WAVEjunkjunkjunk')
  for name, message in (('stereo.wav', 'stereo.wav: 2 channel(s); expected 1'),
                        ('garbage.wav', 'garbage.wav: not a readable audio file')):
    line = {**tts_line(''), 'audio': name, 'sample_rate': 24000}
    del line['codes']
    manifest = write_manifest(tmp_path / 'm.jsonl', [line])
    got = prepare_error(capsys, tok, manifest, tmp_path / 'out', '--strict', '--codec', 'toy')
    assert f'{manifest}:1: ' in got and message in got


# ---- chat ------------------------------------------------------------------------------------

def chat_error(capsys, tiny_dir, user, *flags):
  return error_line(capsys, 'chat', '--checkpoint', tiny_dir, '--user', user, *flags)


@pytest.fixture
def wavs(tmp_path):
  codec = ToyCodec()
  wave = codec.decode(np.random.default_rng(1).integers(0, 2048, (8, 4)))  # 4 frames
  soundfile.write(tmp_path / 'stereo.wav', np.stack([wave, np.zeros_like(wave)], 1), 24000)
  soundfile.write(tmp_path / 'empty.wav', np.zeros((0,), np.float32), 24000)
  soundfile.write(tmp_path / 'short.wav', wave[:1000], 24000)
  (tmp_path / 'garbage.wav').write_bytes(np.random.default_rng(0).bytes(300))
  (tmp_path / 'song.mp3').write_bytes(b'ID3')
  return tmp_path


@pytest.mark.parametrize('name, flags, message', [
    ('stereo.wav', (), 'stereo.wav: 2 channels, but one speaker is needed; choose one with '
                       '--channel N (0..1)'),
    ('stereo.wav', ('--channel', '2'), 'channel 2 does not exist: the file has 2 channel(s)'),
    ('garbage.wav', (), 'garbage.wav: not a readable audio file'),
    ('empty.wav', (), 'empty.wav: the audio holds no samples'),
    ('short.wav', (), 'short.wav: 1000 samples at 24000 Hz, shorter than one 80 ms frame'),
    ('stereo.wav', ('--tail', '-5'), '--tail -5 must be >= 0'),
    ('stereo.wav', ('--max-len', '0'), '--max-len 0 must be >= 1'),
    ('stereo.wav', ('--channel', '-1'), '--channel -1 must be >= 0'),
    ('stereo.wav', ('--temp-text', '-1'), '--temp-text -1.0: temperature must be >= 0'),
    ('stereo.wav', ('--top-p-audio', '2'), '--top-p-audio 2.0: top_p must lie in [0, 1]'),
    ('stereo.wav', ('--overflow', 'wrap'), "argument --overflow: invalid choice: 'wrap'"),
    ('missing.wav', (), 'missing.wav: no such file'),
    ('song.mp3', (), "song.mp3: give codes as a .npy or audio as one of ('.wav', '.flac', '.ogg')"),
], ids=['stereo', 'no_channel_2', 'garbage', 'empty', 'short', 'tail', 'max_len', 'channel',
        'temp', 'top_p', 'overflow', 'missing', 'mp3'])
def test_chat_bad_wav_and_flags(capsys, tiny_dir, wavs, name, flags, message):
  assert message in chat_error(capsys, tiny_dir, wavs / name, *flags)


@pytest.mark.parametrize('shape, message', [
    ((30, 8), 'codes of shape (30, 8) look transposed; save them as [8, frames] (codes.T)'),
    ((8, 0), 'the codes hold 0 frames'),
    ((8, 5, 2), 'expected codes of shape [8, frames], got (8, 5, 2)'),
    ('pad+1', 'codes must be integers in 0..2048 (PAD)'),
    ('float', 'codes must be integers in 0..2048 (PAD), got dtype float64'),
    ('truncated', 'not a readable .npy file (truncated or another format'),
], ids=['transposed', 'empty', '3d', 'above_pad', 'float', 'truncated'])
def test_chat_bad_codes(capsys, tiny_dir, tmp_path, shape, message):
  user = tmp_path / 'user.npy'
  if shape == 'pad+1':
    np.save(user, np.full((8, 4), 2049))
  elif shape == 'float':
    np.save(user, np.zeros((8, 4)))
  elif shape == 'truncated':
    np.save(user, np.zeros((8, 40), np.int32))
    user.write_bytes(user.read_bytes()[:150])
  else:
    np.save(user, np.zeros(shape, np.int32))
  line = chat_error(capsys, tiny_dir, user)
  assert str(user) in line and message in line
  assert '--channel applies to an audio --user' in chat_error(capsys, tiny_dir, user, '--channel',
                                                               '0')


def test_chat_checkpoint_and_out_checked_before_decoding(capsys, tiny_dir, tmp_path):
  user = tmp_path / 'user.npy'
  np.save(user, np.zeros((8, 3), np.int32))
  (tmp_path / 'weights').mkdir()
  (tmp_path / 'weights' / 'model.safetensors').write_bytes((tiny_dir / 'model.safetensors')
                                                           .read_bytes())
  line = chat_error(capsys, tmp_path / 'weights', user)
  assert 'safetensors weights without config.json; put the config.json' in line
  (tmp_path / 'empty').mkdir()
  assert 'empty: neither an official checkpoint (config.json + safetensors) nor a training run' \
      in chat_error(capsys, tmp_path / 'empty', user)
  assert os.listdir(tmp_path / 'empty') == []
  (tmp_path / 'taken').write_text('keep me')
  rc, out, err = run(capsys, 'chat', '--checkpoint', tiny_dir, '--user', user, '--out',
                     tmp_path / 'taken')
  assert rc == 1 and 'taken is a file; give a directory' in err
  assert out == '' and (tmp_path / 'taken').read_text() == 'keep me'  # nothing decoded
  done = tmp_path / 'done'
  done.mkdir()
  (done / 'transcript.txt').write_text('an earlier session')
  line = chat_error(capsys, tiny_dir, user, '--out', done)
  assert "already holds ['transcript.txt']; pass --overwrite to replace them" in line
  assert (done / 'transcript.txt').read_text() == 'an earlier session'


def test_chat_overflow_writes_what_was_decoded(capsys, tiny_dir, tmp_path):
  user = tmp_path / 'user.npy'
  np.save(user, np.random.default_rng(0).integers(0, 2048, (8, 8)))
  out = tmp_path / 'out'
  line = chat_error(capsys, tiny_dir, user, '--max-len', '5', '--out', out, '--greedy')
  assert 'reached --max-len 5 frames at user frame 5 of 8; raise --max-len or pass --overflow ' \
         'slide; wrote the 4 model frames decoded so far to' in line
  assert np.load(out / 'model_codes.npy').shape == (8, 4)  # step 0 returns no frame
  assert np.load(out / 'text_ids.npy').shape == (4,)


def test_chat_stereo_with_a_channel_and_another_rate(capsys, tiny_dir, tmp_path):
  """The explicit choices work: --channel picks one channel (never an average), and a 48 kHz file
  is resampled to the codec's 24 kHz with soxr."""
  import soxr
  codec = ToyCodec()
  codes = np.random.default_rng(2).integers(0, 2048, (8, 3))
  wave = codec.decode(codes)
  soundfile.write(tmp_path / 's.wav', np.stack([np.zeros_like(wave), wave], 1), 24000)
  rc, _, err = run(capsys, 'chat', '--checkpoint', tiny_dir, '--user', tmp_path / 's.wav',
                   '--channel', '1', '--out', tmp_path / 'o1', '--greedy')
  assert rc == 0, err
  soundfile.write(tmp_path / 'hi.wav', soxr.resample(wave, 24000, 48000, 'VHQ'), 48000)
  rc, _, err = run(capsys, 'chat', '--checkpoint', tiny_dir, '--user', tmp_path / 'hi.wav',
                   '--out', tmp_path / 'o2', '--greedy')
  assert rc == 0, err
  from flmjax.data.audio import read_audio
  (right,) = read_audio(tmp_path / 's.wav', channel=1)
  np.testing.assert_array_equal(codec.encode(right), codes)
  (resampled,) = read_audio(tmp_path / 'hi.wav')
  assert resampled.shape == wave.shape
  np.testing.assert_array_equal(codec.encode(resampled), codes)
  np.testing.assert_array_equal(np.load(tmp_path / 'o1' / 'text_ids.npy'),
                                np.load(tmp_path / 'o2' / 'text_ids.npy'))
