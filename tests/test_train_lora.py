"""Issue 18: LoRA training runs: checkpoints of adapters only, tied to their base; export."""

import json

import jax
import numpy as np
import pytest

from flmjax.checkpoint.checkpointer import Checkpointer
from flmjax.train.config import TrainConfigError, load_config_file
from flmjax.train.loop import train

pytestmark = pytest.mark.slow  # LoRA training runs

CONFIG = """
from flmjax.config import ModelConfig
from flmjax.train.config import LoraConfig, MeshConfig, OptimConfig, StageConfig, TrainConfig


def get_config(run_dir, lora=LoraConfig(4, 8.0, targets=('attn', 'mlp', 'depth', 'heads'),
                                        base_dtype='int8'), seed=0):
  stages = (StageConfig('a', 2, random_data=True, peak_lr=3e-3),
            StageConfig('b', 2, random_data=True, peak_lr=1e-3))
  return TrainConfig(model=ModelConfig.tiny(), stages=stages, run_dir=run_dir, window=12,
                     batch_size=8, compute_dtype='float32', optim=OptimConfig(eps=1e-3),
                     mesh=MeshConfig(2, 2, 2), checkpoint_every=2, keep_checkpoints=2,
                     log_every=1, progress_bar=False, lora=lora, seed=seed)
"""


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A LoRA run (int8 base from the seed) stopped after its first stage."""
  root = tmp_path_factory.mktemp('lora_run')
  config = root / 'cfg.py'
  config.write_text(CONFIG)
  tc = load_config_file(str(config), str(root / 'run'))
  out = train(tc, stop_after=2, log=lambda *a: None)
  return config, tc, out


def test_checkpoint_holds_adapters_and_the_base_fingerprint(lora_run):
  _, tc, out = lora_run
  ckpt = Checkpointer(f'{tc.run_dir}/checkpoints', use_async=False)
  meta = ckpt.restore_meta()
  tree = json.loads((ckpt.directory / '2' / 'params' / '_METADATA').read_text())
  ckpt.close()
  assert meta['lora']['rank'] == 4 and meta['lora']['base_dtype'] == 'int8'
  assert len(meta['base_fingerprint']) == 64
  names = {k for k in json.dumps(tree).split('"') if k.endswith(('_lora_a', '_lora_b'))}
  assert 'q_lora_a' in names and 'heads_lora_b' in names
  for base_name in ('"q"', '"text_embed"', '"q_scale"', '"input_norm"'):
    assert base_name not in json.dumps(tree)  # no base in the checkpoint
  assert out['base']['backbone']['q'].dtype == np.int8


def _resume(config, tc, **kw):
  import importlib.util

  spec = importlib.util.spec_from_file_location('cfg', config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return train(module.get_config(tc.run_dir, **kw), log=lambda *a: None)


@pytest.mark.parametrize(
  'kw, match',
  [
    (dict(lora=None), r'holds LoRA adapters \(rank 4.*this config has no lora'),
    (dict(seed=1), 'trained on another base'),
  ],
)
def test_resume_refuses_another_lora_config_or_base(lora_run, kw, match):
  config, tc, _ = lora_run
  with pytest.raises(TrainConfigError, match=match):
    _resume(config, tc, **kw)


def test_resume_with_another_rank_is_one_line_error(lora_run, capsys):
  config, tc, _ = lora_run
  other = config.parent / 'other_rank.py'
  other.write_text(CONFIG.replace('LoraConfig(4, 8.0', 'LoraConfig(8, 8.0'))
  from flmjax.cli import main

  assert main(['train', '--config', str(other), '--run_dir', tc.run_dir, '--noprogress']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'LoRA config differs in rank=4 vs 8' in err[0], err


def test_lora_run_resumes_to_the_end(lora_run):
  config, tc, _ = lora_run
  out = _resume(config, tc)
  assert out['global_step'] == 4
  assert jax.tree.leaves(out['state'].params)


def test_dropout_run_resumes_bit_identical(tmp_path):
  """LoRA dropout draws from the seed and the update count: a run stopped mid-stage and resumed
  ends with the adapters of the uninterrupted run, bit for bit."""
  from flmjax.model.lora import LoraConfig

  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG)
  lc = LoraConfig(4, 8.0, targets=('attn', 'mlp', 'depth', 'heads'), dropout=0.3, base_dtype='int8')
  quiet = lambda *a: None
  straight = train(load_config_file(str(config), str(tmp_path / 'a')).replace(lora=lc), log=quiet)
  tc = load_config_file(str(config), str(tmp_path / 'b')).replace(lora=lc)
  train(tc, stop_after=1, log=quiet)
  resumed = train(tc, log=quiet)
  assert resumed['global_step'] == straight['global_step'] == 4
  for a, b in zip(
    jax.tree.leaves(jax.device_get(straight['state'].params)),
    jax.tree.leaves(jax.device_get(resumed['state'].params)),
  ):
    assert np.array_equal(a, b)


def test_chat_takes_a_lora_run_whose_base_moved(tmp_path, tiny_dir, capsys):
  """A LoRA run trained from --init_from DIR chats with `--base` once DIR has moved, as its
  float32 merged export does; without `--base`, one line names the flag."""
  import shutil

  from flmjax import cli
  from flmjax.model.lora import LoraConfig

  base = tmp_path / 'base'
  shutil.copytree(tiny_dir, base)
  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG)
  run = tmp_path / 'run'
  tc = load_config_file(str(config), str(run)).replace(
    init_from=str(base), lora=LoraConfig(4, 8.0, base_dtype='float32')
  )
  train(tc, stop_after=1, log=lambda *a: None)
  moved = base.rename(tmp_path / 'moved')
  np.save(tmp_path / 'user.npy', np.load(tiny_dir / 'stream.npz')['user'][0, :, :8])
  chat = ['chat', '--user', str(tmp_path / 'user.npy'), '--greedy']
  assert cli.main([*chat, '--checkpoint', str(run)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'base {base} is not there; pass --base DIR' in err[0], err
  assert (
    cli.main([*chat, '--checkpoint', str(run), '--base', str(moved), '--out', str(tmp_path / 'a')])
    == 0
  )
  assert (
    cli.main(
      ['export', str(run), str(tmp_path / 'merged'), '--base', str(moved), '--dtype', 'float32']
    )
    == 0
  )
  assert (
    cli.main([*chat, '--checkpoint', str(tmp_path / 'merged'), '--out', str(tmp_path / 'b')]) == 0
  )
  for name in ('text_ids.npy', 'model_codes.npy'):
    assert np.array_equal(np.load(tmp_path / 'a' / name), np.load(tmp_path / 'b' / name))
  capsys.readouterr()
  assert cli.main([*chat, '--checkpoint', str(tmp_path / 'merged'), '--base', str(moved)]) == 1
  assert 'is an official checkpoint; --base names the base of a LoRA' in capsys.readouterr().err


def test_merged_export_equals_the_unmerged_forward(lora_run, tmp_path, tiny_dir):
  """flmjax export RUN OUT (--merge): the official layout, read back by load_official, gives the
  logits of the run's unmerged model (int8 base + adapters, float32, <= 1e-5 relative)."""
  import flmjax
  from flmjax.checkpoint import restore as restore_lib
  from flmjax.cli import main

  _, tc, _ = lora_run
  assert (
    main(['export', tc.run_dir, str(tmp_path / 'merged'), '--merge', '--dtype', 'float32']) == 0
  )
  unmerged, _ = restore_lib.restore_model(tc.run_dir, merge=False)
  assert unmerged.lora is not None and unmerged.backbone.q[...].dtype == np.int8
  merged = flmjax.load_official(str(tmp_path / 'merged'), dtype='float32')
  d = np.load(tiny_dir / 'forward.npz')
  args = dict(
    text=d['text'], speak=d['speak'], listen=d['listen'], depth_prev=d['depth_tokens'][..., :7]
  )
  a, b = merged(**args), unmerged(**args)
  for x, y in ((a.text_logits, b.text_logits), (a.depth_logits, b.depth_logits)):
    assert float(np.max(np.abs(x - y)) / np.max(np.abs(y))) <= 1e-5


def test_adapters_export_writes_peft_files(lora_run, tmp_path, capsys):
  from safetensors.numpy import load_file

  from flmjax.cli import main

  _, tc, _ = lora_run
  assert main(['export', tc.run_dir, str(tmp_path / 'peft'), '--adapters']) == 0
  # The run's base is int8: one warning line that PEFT's full-precision base is another model.
  [warning] = capsys.readouterr().err.strip().splitlines()
  assert warning.startswith('warning: ') and 'int8 base' in warning and '--merge' in warning
  config = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert config['peft_type'] == 'LORA' and config['r'] == 4 and config['lora_alpha'] == 8.0
  assert 'model.layers.0.self_attn.q_proj' in config['target_modules']
  assert 'aud_output_layers.transformer.h.1.attn.c_attn' in config['target_modules']
  tensors = load_file(str(tmp_path / 'peft' / 'adapter_model.safetensors'))
  a = tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
  b = tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight']
  assert a.shape == (4, 64) and b.shape == (64, 4) and np.any(b)
  assert tensors['base_model.model.lm_head.lora_B.weight'].shape == (320, 4)  # vocab unpadded


@pytest.mark.parametrize(
  'args, match',
  [
    (['--merge', '--adapters'], '--merge and --adapters exclude each other'),
    (['--adapters', '--base', '/nonexistent/base'], 'base /nonexistent/base is not there'),
  ],
)
def test_export_bad_lora_flags(lora_run, tmp_path, capsys, args, match):
  from flmjax.cli import main

  _, tc, _ = lora_run
  assert main(['export', tc.run_dir, str(tmp_path / 'out')] + args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0], err


def test_export_adapters_of_a_full_run_is_refused(tmp_path, capsys):
  from flmjax.cli import main

  root = tmp_path / 'full'
  config = root / 'cfg.py'
  root.mkdir()
  config.write_text(CONFIG)
  tc = load_config_file(str(config), str(root / 'run')).replace(lora=None)
  train(tc, stop_after=2, log=lambda *a: None)
  assert main(['export', tc.run_dir, str(tmp_path / 'out'), '--adapters']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'is a full fine-tune, not a LoRA run' in err[0], err


def test_a_lora_run_or_its_adapter_where_a_model_is_wanted(lora_run, tmp_path, capsys):
  """Issue 25: --init-from a LoRA run points to `flmjax export --merge`; the run's PEFT adapter
  given to chat as --checkpoint says what it is and how to use it. Nothing is created."""
  from probe import error_line

  from flmjax import cli

  config, tc, _ = lora_run
  line = error_line(
    capsys, 'train', '--config', config, '--run-dir', tmp_path / 'new', '--init-from', tc.run_dir
  )
  assert (
    f'--init-from {tc.run_dir} is a LoRA training run, not an official checkpoint; merge it '
    f'into its base first: `flmjax export --merge {tc.run_dir} OUT_DIR`, then give OUT_DIR'
  ) in line
  assert not (tmp_path / 'new').exists()
  assert cli.main(['export', tc.run_dir, str(tmp_path / 'adapter'), '--adapters']) == 0
  capsys.readouterr()
  np.save(tmp_path / 'user.npy', np.zeros((8, 3), np.int32))
  line = error_line(
    capsys,
    'chat',
    '--checkpoint',
    tmp_path / 'adapter',
    '--user',
    tmp_path / 'user.npy',
    '--out',
    tmp_path / 'out',
  )
  assert f'--checkpoint {tmp_path / "adapter"} is a LoRA adapter (PEFT' in line
  assert '`flmjax export --merge RUN_DIR OUT_DIR`' in line and not (tmp_path / 'out').exists()
