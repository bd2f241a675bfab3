"""`flmjax chat` end to end on the golden tiny checkpoint."""

import numpy as np
import pytest

from flmjax import cli

pytestmark = pytest.mark.slow  # flmjax chat sessions end to end


def test_chat_reproduces_the_golden_stream(tiny_dir, tmp_path, capsys):
  golden = np.load(tiny_dir / 'stream.npz')
  user = tmp_path / 'user.npy'
  np.save(user, golden['user'][0])  # [8, 24]
  out = tmp_path / 'out'
  rc = cli.main(
    [
      'chat',
      '--checkpoint',
      str(tiny_dir),
      '--user',
      str(user),
      '--out',
      str(out),
      '--greedy',
      '--repetition-penalty-text',
      '1.0',
      '--repetition-penalty-audio',
      '1.0',
    ]
  )
  assert rc == 0
  want = golden['out_plain'][1:]  # [23, 9]: step 0 returns nothing
  np.testing.assert_array_equal(np.load(out / 'model_codes.npy'), want[:, 1:].T)
  np.testing.assert_array_equal(np.load(out / 'text_ids.npy'), want[:, 0])
  # The transcript skips WAIT (317), BOS (316) and EOS (318).
  shown = ''.join(f'<{i}>' for i in want[:, 0] if i not in (316, 317, 318))
  assert shown in capsys.readouterr().out
  assert (out / 'transcript.txt').read_text().strip() == shown


def test_chat_with_a_tokenizer_and_a_wav(tiny_dir, tmp_path, capsys):
  import soundfile

  from flmjax.codec.toy import ToyCodec
  from flmjax.data.tokenizer import train_sentencepiece

  words = 'what is two plus three five seven hello there yes no'.split()
  texts = [' '.join(words[i:] + words[:i]) for i in range(len(words))] * 5
  tok = train_sentencepiece(texts, tmp_path / 'sp.model', vocab_size=60)
  codes = np.random.default_rng(0).integers(0, 2048, (8, 6))
  codec = ToyCodec()
  soundfile.write(tmp_path / 'user.wav', codec.decode(codes), codec.sample_rate)
  out = tmp_path / 'out'
  assert (
    cli.main(
      [
        'chat',
        '--checkpoint',
        str(tiny_dir),
        '--user',
        str(tmp_path / 'user.wav'),
        '--out',
        str(out),
        '--tokenizer',
        str(tok.path),
        '--tail',
        '1',
        '--seed',
        '3',
      ]
    )
    == 0
  )
  text_ids = np.load(out / 'text_ids.npy')
  assert text_ids.shape == (6,)  # 6 user frames + 1 tail step -> 6 model frames
  known = [int(i) for i in text_ids if i < tok.vocab_size]
  assert (out / 'transcript.txt').read_text().strip() == tok.decode(known).strip()
  assert (out / 'reply.wav').exists()


def test_chat_rejects_bad_inputs(tiny_dir, tmp_path, capsys):
  """One stderr line and exit status 1 (tests/test_bad_input.py covers every case)."""
  bad = tmp_path / 'bad.npy'
  np.save(bad, np.zeros((4, 10), np.int32))
  assert cli.main(['chat', '--checkpoint', str(tiny_dir), '--user', str(bad)]) == 1
  assert 'expected codes of shape [8, frames], got (4, 10)' in capsys.readouterr().err
  assert cli.main(['chat', '--checkpoint', str(tmp_path / 'nope'), '--user', str(bad)]) == 1
  assert 'no such directory' in capsys.readouterr().err
  assert (
    cli.main(['chat', '--checkpoint', str(tiny_dir), '--user', str(tmp_path / 'missing.wav')]) == 1
  )
  assert 'missing.wav: no such file' in capsys.readouterr().err


def test_chat_reads_an_orbax_training_checkpoint(tiny_model, tiny_dir, tmp_path, capsys):
  """A training run's orbax checkpoint (the embedded default's format) chats like its weights."""
  import jax.numpy as jnp
  from flax import nnx

  from flmjax.checkpoint.checkpointer import Checkpointer
  from flmjax.train.config import to_json
  from flmjax.train.state import TrainState

  ckpt = Checkpointer(str(tmp_path / 'run' / 'checkpoints'), use_async=False)
  params = nnx.to_pure_dict(nnx.state(tiny_model))
  ckpt.save(
    5,
    TrainState(params, {'count': jnp.zeros((), jnp.int32)}),
    {'model_config': to_json(tiny_model.cfg)},
    force=True,
  )
  ckpt.close()
  golden = np.load(tiny_dir / 'stream.npz')
  np.save(tmp_path / 'user.npy', golden['user'][0, :, :8])
  out = tmp_path / 'out'
  assert (
    cli.main(
      [
        'chat',
        '--checkpoint',
        str(tmp_path / 'run'),
        '--user',
        str(tmp_path / 'user.npy'),
        '--out',
        str(out),
        '--greedy',
        '--repetition-penalty-text',
        '1.0',
        '--repetition-penalty-audio',
        '1.0',
      ]
    )
    == 0
  )
  np.testing.assert_array_equal(np.load(out / 'text_ids.npy'), golden['out_plain'][1:8, 0])
  # --base names a LoRA run's base: on a full fine-tune it is one line, before any weights load.
  assert (
    cli.main(
      [
        'chat',
        '--checkpoint',
        str(tmp_path / 'run'),
        '--user',
        str(tmp_path / 'user.npy'),
        '--base',
        str(tiny_dir),
      ]
    )
    == 1
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f'flmjax chat: error: --base: {tmp_path / "run"} is a full fine-tune, not a LoRA '
    'run; drop --base'
  ], err
