"""Bad-input probes of `flmjax chat` (issue 13 §2, issue 22): each bad WAV, codes file, flag or
checkpoint gets one stderr line naming the file or flag and what to do, exit status 1; --out is
checked before decoding, and an overflow keeps what was decoded."""

import os

import numpy as np
import pytest
import soundfile
from probe import error_line, run

from flmjax.codec.toy import ToyCodec


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
  soundfile.write(tmp_path / 'full.wav', wave, 24000)
  (tmp_path / 'cut.wav').write_bytes((tmp_path / 'full.wav').read_bytes()[:-3000])
  return tmp_path


@pytest.mark.parametrize(
  'name, flags, message',
  [
    (
      'stereo.wav',
      (),
      'stereo.wav: 2 channels, but one speaker is needed; choose one with --channel N (0..1)',
    ),
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
    (
      'cut.wav',
      (),
      'cut.wav: truncated WAV: its header says 15360 bytes of audio, the file holds 12360',
    ),
  ],
  ids=[
    'stereo',
    'no_channel_2',
    'garbage',
    'empty',
    'short',
    'tail',
    'max_len',
    'channel',
    'temp',
    'top_p',
    'overflow',
    'missing',
    'mp3',
    'cut',
  ],
)
def test_chat_bad_wav_and_flags(capsys, tiny_dir, wavs, name, flags, message):
  assert message in chat_error(capsys, tiny_dir, wavs / name, *flags)


@pytest.mark.parametrize(
  'shape, message',
  [
    ((30, 8), 'codes of shape (30, 8) look transposed; save them as [8, frames] (codes.T)'),
    ((8, 0), 'the codes hold 0 frames'),
    ((8, 5, 2), 'expected codes of shape [8, frames], got (8, 5, 2)'),
    ('pad+1', 'codes must be integers in 0..2048 (PAD)'),
    ('float', 'codes must be integers in 0..2048 (PAD), got dtype float64'),
    ('truncated', 'not a readable .npy file (truncated or another format'),
  ],
  ids=['transposed', 'empty', '3d', 'above_pad', 'float', 'truncated'],
)
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
  assert '--channel applies to an audio --user' in chat_error(
    capsys, tiny_dir, user, '--channel', '0'
  )


def test_chat_checkpoint_and_out_checked_before_decoding(capsys, tiny_dir, tmp_path):
  user = tmp_path / 'user.npy'
  np.save(user, np.zeros((8, 3), np.int32))
  (tmp_path / 'weights').mkdir()
  (tmp_path / 'weights' / 'model.safetensors').write_bytes(
    (tiny_dir / 'model.safetensors').read_bytes()
  )
  line = chat_error(capsys, tmp_path / 'weights', user)
  assert 'safetensors weights without config.json; put the config.json' in line
  (tmp_path / 'empty').mkdir()
  assert (
    'empty: neither an official checkpoint (config.json + safetensors) nor a training run'
    in chat_error(capsys, tmp_path / 'empty', user)
  )
  assert os.listdir(tmp_path / 'empty') == []
  (tmp_path / 'taken').write_text('keep me')
  rc, out, err = run(
    capsys, 'chat', '--checkpoint', tiny_dir, '--user', user, '--out', tmp_path / 'taken'
  )
  assert rc == 1 and 'taken is a file; give a directory' in err
  assert out == '' and (tmp_path / 'taken').read_text() == 'keep me'  # nothing decoded
  done = tmp_path / 'done'
  done.mkdir()
  (done / 'transcript.txt').write_text('an earlier session')
  line = chat_error(capsys, tiny_dir, user, '--out', done)
  assert "already holds ['transcript.txt']; pass --overwrite to replace them" in line
  assert (done / 'transcript.txt').read_text() == 'an earlier session'


@pytest.mark.slow
def test_chat_overflow_writes_what_was_decoded(capsys, tiny_dir, tmp_path):
  user = tmp_path / 'user.npy'
  np.save(user, np.random.default_rng(0).integers(0, 2048, (8, 8)))
  out = tmp_path / 'out'
  line = chat_error(capsys, tiny_dir, user, '--max-len', '5', '--out', out, '--greedy')
  assert (
    'reached --max-len 5 frames at user frame 5 of 8; raise --max-len or pass --overflow '
    'slide; wrote the 4 model frames decoded so far to' in line
  )
  assert np.load(out / 'model_codes.npy').shape == (8, 4)  # step 0 returns no frame
  assert np.load(out / 'text_ids.npy').shape == (4,)


@pytest.mark.slow
def test_chat_stereo_with_a_channel_and_another_rate(capsys, tiny_dir, tmp_path):
  """The explicit choices work: --channel picks one channel (never an average), and a 48 kHz file
  is resampled to the codec's 24 kHz with soxr."""
  import soxr

  codec = ToyCodec()
  codes = np.random.default_rng(2).integers(0, 2048, (8, 3))
  wave = codec.decode(codes)
  soundfile.write(tmp_path / 's.wav', np.stack([np.zeros_like(wave), wave], 1), 24000)
  rc, _, err = run(
    capsys,
    'chat',
    '--checkpoint',
    tiny_dir,
    '--user',
    tmp_path / 's.wav',
    '--channel',
    '1',
    '--out',
    tmp_path / 'o1',
    '--greedy',
  )
  assert rc == 0, err
  soundfile.write(tmp_path / 'hi.wav', soxr.resample(wave, 24000, 48000, 'VHQ'), 48000)
  rc, _, err = run(
    capsys,
    'chat',
    '--checkpoint',
    tiny_dir,
    '--user',
    tmp_path / 'hi.wav',
    '--out',
    tmp_path / 'o2',
    '--greedy',
  )
  assert rc == 0, err
  from flmjax.data.audio import read_audio

  (right,) = read_audio(tmp_path / 's.wav', channel=1)
  np.testing.assert_array_equal(codec.encode(right), codes)
  (resampled,) = read_audio(tmp_path / 'hi.wav')
  assert resampled.shape == wave.shape
  np.testing.assert_array_equal(codec.encode(resampled), codes)
  np.testing.assert_array_equal(
    np.load(tmp_path / 'o1' / 'text_ids.npy'), np.load(tmp_path / 'o2' / 'text_ids.npy')
  )


def test_chat_checkpoint_of_another_kind(capsys, tiny_dir, golden_dir, tmp_path):
  """A PEFT adapter (as `flmjax export --adapters` writes it) or the Mimi codec given as
  --checkpoint: named for what it is, with the way to use it (issue 25)."""
  import jax
  from flax import nnx

  from flmjax.checkpoint import peft as adapters
  from flmjax.config import ModelConfig
  from flmjax.model.flm import abstract
  from flmjax.model.lora import LoraConfig

  user = tmp_path / 'user.npy'
  np.save(user, np.zeros((8, 3), np.int32))
  cfg = ModelConfig.from_official(str(tiny_dir / 'config.json'))
  graphdef, state = nnx.split(abstract(cfg, LoraConfig(4, 8.0, targets=('attn',))))
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)  # the values do not matter
  model = nnx.merge(graphdef, zeros)
  adapter = adapters.write_peft(model, str(tmp_path / 'adapter'), base_name=str(tiny_dir))
  line = chat_error(capsys, adapter, user)
  assert (
    f'--checkpoint {adapter} is a LoRA adapter (PEFT, from `flmjax export --adapters`), not a '
    'whole model; give the LoRA training run it came from, or merge it into its base once: '
    '`flmjax export --merge RUN_DIR OUT_DIR` and give OUT_DIR (PyTorch: load it onto its base '
    f'model ({tiny_dir}) with peft)' in line
  )
  assert 'is a LoRA adapter' in chat_error(
    capsys, os.path.join(adapter, 'adapter_model.safetensors'), user
  )
  line = chat_error(capsys, golden_dir / 'mimi_small', user)
  assert (
    'mimi_small is a Mimi codec checkpoint (the audio tokenizer), not an FLM-Audio model; '
    'here give the model (config.json + model.safetensors, or a training run)' in line
  )
  assert sorted(os.listdir(tmp_path)) == ['adapter', 'user.npy']  # nothing written
