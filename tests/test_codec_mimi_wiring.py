"""Mimi wired in: batched/sharded encoding for `flmjax data prepare`, exact against one call."""

import json

import numpy as np
import pytest
import soundfile

from flmjax import cli
from flmjax.codec import load_mimi
from flmjax.codec.base import FRAME_SIZE
from flmjax.codec.mimi_codec import MimiCodec, receptive_field_frames
from flmjax.data.records import read_all
from flmjax.data.tokenizer import train_sentencepiece

pytestmark = pytest.mark.slow  # Mimi through prepare and chat

FRAME = FRAME_SIZE  # samples per 80 ms frame


@pytest.fixture(scope='module')
def small(golden_dir):
  return load_mimi(str(golden_dir / 'mimi_small'))


@pytest.fixture(scope='module')
def pcm(golden_dir):
  return np.load(golden_dir / 'mimi_small' / 'mimi.npz')['pcm']


def test_encode_batch_equals_single_calls(small, pcm):
  # Windows of 20 frames force the 62-frame wave through three warmed-up windows.
  codec = MimiCodec(small, window_frames=20)
  assert codec.mesh.devices.size == 8  # rows sharded over the 8 simulated devices
  assert codec.warmup_frames == receptive_field_frames(small.cfg) == 35
  waves = [pcm, pcm[:5000], pcm[3000:40000], 0.5 * pcm[: 7 * FRAME]]
  got = codec.encode_batch(waves)
  for wave, codes in zip(waves, got):
    want = np.asarray(small.encode(wave[None]))[0]
    assert codes.shape == (8, -(-wave.size // FRAME)) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, want)
  with pytest.raises(ValueError, match='wave 1: pcm has NaN'):
    codec.encode_batch([pcm[:FRAME], np.full(FRAME, np.nan, np.float32)])


def test_prepare_with_mimi(tmp_path, golden_dir, small, pcm, capsys):
  train_sentencepiece(['hello there', 'it is five'] * 5, tmp_path / 'tok.model', 40)
  import soxr

  soundfile.write(tmp_path / 'a24.wav', pcm[: 20 * FRAME], 24000)
  soundfile.write(tmp_path / 'b16.flac', soxr.resample(pcm[:48000], 24000, 16000), 16000)
  stereo = np.stack([pcm[: 15 * FRAME], pcm[15 * FRAME : 30 * FRAME]], axis=1)
  soundfile.write(tmp_path / 'duplex.wav', stereo, 24000)
  nan = pcm[: 5 * FRAME].copy()
  nan[100] = np.nan
  soundfile.write(tmp_path / 'nan.wav', nan, 24000, subtype='FLOAT')
  seg = lambda speaker='model': {
    'speaker': speaker,
    'start': 0.0,
    'end': 0.8,
    'text': 'hello there',
  }
  lines = [
    {'id': 'a', 'kind': 'tts_asr', 'sample_rate': 24000, 'audio': 'a24.wav', 'segments': [seg()]},
    {'id': 'b', 'kind': 'tts_asr', 'sample_rate': 16000, 'audio': 'b16.flac', 'segments': [seg()]},
    {
      'id': 'd',
      'kind': 'duplex',
      'sample_rate': 24000,
      'audio': 'duplex.wav',
      'segments': [seg(), seg('user')],
    },
    {'id': 'n', 'kind': 'tts_asr', 'sample_rate': 24000, 'audio': 'nan.wav', 'segments': [seg()]},
  ]
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
  assert (
    cli.main(
      [
        'data',
        'prepare',
        str(tmp_path / 'm.jsonl'),
        str(tmp_path / 'out'),
        '--tokenizer',
        str(tmp_path / 'tok.model'),
        '--codec',
        'mimi',
        '--mimi',
        str(golden_dir / 'mimi_small'),
        '--audio-batch',
        '3',
        '--no-progress',
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert 'prepared 3 samples' in out and 'h of audio per second' in out
  assert 'nan.wav: the audio holds NaN' in out
  records = {r.id: r for r in read_all(tmp_path / 'out')}
  encode = lambda wave: np.asarray(small.encode(wave[None]))[0]
  np.testing.assert_array_equal(records['a'].codes['model'], encode(pcm[: 20 * FRAME]))
  np.testing.assert_array_equal(records['d'].codes['model'], encode(stereo[:, 0]))
  np.testing.assert_array_equal(records['d'].codes['user'], encode(stereo[:, 1]))
  assert records['b'].codes['model'].shape == (8, 25)  # 2 s at 16 kHz -> 48000 samples at 24 kHz
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  channel_samples = 20 * FRAME + 48000 + 2 * 15 * FRAME  # a duplex file counts both channels
  assert summary['audio_hours'] == pytest.approx(channel_samples / 24000 / 3600, rel=1e-3)
  assert (
    cli.main(
      [
        'data',
        'prepare',
        str(tmp_path / 'm.jsonl'),
        str(tmp_path / 'o2'),
        '--tokenizer',
        str(tmp_path / 'tok.model'),
        '--codec',
        'mimi',
      ]
    )
    == 1
  )
  assert '--codec mimi and --mimi PATH go together' in capsys.readouterr().err


def test_chat_speaks_through_mimi(tiny_dir, golden_dir, small, pcm, tmp_path, capsys):
  """`flmjax chat --user user.wav --mimi PATH`: the user's audio is Mimi-encoded (a 16 kHz file
  resampled first) and the reply is Mimi-decoded into reply.wav beside the transcript."""
  import soxr

  soundfile.write(tmp_path / 'user.wav', soxr.resample(pcm[: 6 * FRAME], 24000, 16000), 16000)
  out = tmp_path / 'out'
  assert (
    cli.main(
      [
        'chat',
        '--checkpoint',
        str(tiny_dir),
        '--user',
        str(tmp_path / 'user.wav'),
        '--mimi',
        str(golden_dir / 'mimi_small'),
        '--out',
        str(out),
        '--tail',
        '1',
      ]
    )
    == 0
  )
  assert 'reply.wav' in capsys.readouterr().out
  codes = np.load(out / 'model_codes.npy')  # [8, F]
  assert (out / 'transcript.txt').exists() and codes.shape == (8, 6)
  reply, rate = soundfile.read(out / 'reply.wav', dtype='float32')
  assert rate == 24000 and reply.shape == (6 * FRAME,)
  want = np.asarray(small.decode(codes[None]))[0]
  np.testing.assert_allclose(reply, np.clip(want, -1, 1), atol=2 / 32768)  # 16-bit PCM WAV
  # The same session from the user's Mimi codes gives the same reply: the WAV went through Mimi.
  from flmjax.data.audio import read_audio

  user = np.asarray(small.encode(read_audio(tmp_path / 'user.wav')))[0]
  np.save(tmp_path / 'user.npy', user)
  assert (
    cli.main(
      [
        'chat',
        '--checkpoint',
        str(tiny_dir),
        '--user',
        str(tmp_path / 'user.npy'),
        '--out',
        str(tmp_path / 'out2'),
        '--tail',
        '1',
      ]
    )
    == 0
  )
  np.testing.assert_array_equal(np.load(tmp_path / 'out2' / 'model_codes.npy'), codes)
