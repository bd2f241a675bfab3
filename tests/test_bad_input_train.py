"""Bad-input probes of `flmjax train`, `flmjax export`, the model's public call and the top-level
CLI (issue 13 §2): one stderr line naming the file:line, field or flag and what to do, exit
status 1; export never deletes what is not its own."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from probe import error_line, run

HEADER = """\
from flmjax.config import ModelConfig
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.train.config import MeshConfig, OptimConfig, StageConfig, TrainConfig
"""
GOOD = """\
def get_config(run_dir):
  stage = StageConfig('one', steps=2, random_data=True)
  return TrainConfig(model=ModelConfig.tiny(), stages=(stage,), run_dir=run_dir, window=8)
"""


def config_file(tmp_path, body: str) -> str:
  path = tmp_path / 'cfg.py'
  path.write_text(HEADER + textwrap.dedent(body))
  return str(path)


def edit(**replace) -> str:
  body = GOOD
  for old, new in replace.values():
    body = body.replace(old, new)
  return body


@pytest.mark.parametrize(
  'body, line, message',
  [
    ('def get_config(run_dir)\n  return 1\n', 5, 'syntax error: expected'),
    (
      edit(a=('window=8', 'window=8, learning_rate=1e-3')),
      7,
      "TrainConfig has no field 'learning_rate'; its fields: model, stages",
    ),
    (
      edit(a=('random_data=True', 'random_data=True, peak_lr_=1.0')),
      6,
      "StageConfig has no field 'peak_lr_' (did you mean 'peak_lr'?)",
    ),
    (
      edit(a=('  stage = ', "  src = SourceSpec('d', layot='lead')\n  stage = ")),
      6,
      "SourceSpec has no field 'layot' (did you mean 'layout'?)",
    ),
    (
      edit(a=('  stage = ', "  src = SourceSpec('d', layout='zigzag')\n  stage = ")),
      6,
      "ValueError: SourceSpec('d'): layout 'zigzag' is not one of ('lead', 'trail', 'mixed')",
    ),
    (
      edit(a=('random_data=True', 'random_data=True, peak_lr=-1e-3')),
      6,
      "stage 'one': peak_lr -0.001 must be a positive number",
    ),
    (
      edit(a=('random_data=True', "random_data=True, peak_lr=float('nan')")),
      6,
      "stage 'one': peak_lr nan must be a positive number",
    ),
    (
      edit(a=('random_data=True', 'random_data=True, end_lr_ratio=2.0')),
      6,
      'end_lr_ratio 2.0 must lie in [0, 1]',
    ),
    (
      edit(a=('random_data=True', 'random_data=True, warmup_steps=5')),
      6,
      'warmup_steps 5 must lie in [0, steps=2]',
    ),
    (
      edit(a=('window=8', 'window=8, batch_size=0')),
      7,
      'TrainConfig.batch_size is 0; it must be an integer >= 1',
    ),
    (
      edit(a=('window=8', 'window=8, optim=OptimConfig(weight_decay=-0.1)')),
      7,
      'OptimConfig.weight_decay is -0.1; it must be >= 0',
    ),
    (
      edit(a=('random_data=True', 'random_data=True, loss_weights=LossWeights(wait=-1)')),
      6,
      'ValueError: LossWeights.wait is -1; a loss weight must be a finite number >= 0',
    ),
    (
      edit(a=('window=8', 'window=8, mesh=MeshConfig(fsdp=0)')),
      7,
      'MeshConfig.fsdp is 0; it must be an integer >= 1',
    ),
    (
      edit(a=('ModelConfig.tiny()', 'ModelConfig.tiny(num_kv_heads=3)')),
      7,
      'ConfigError: ModelConfig.num_kv_heads: 4 query heads are not a multiple of 3 KV heads',
    ),
    (
      edit(a=('  stage = ', '  stage = undefined_name\n  stage = ')),
      6,
      "NameError: name 'undefined_name' is not defined",
    ),
    ('x = 1\n', None, 'defines no get_config(run_dir) function'),
    ('def get_config(run_dir):\n  return {}\n', None, 'get_config returned dict, not TrainConfig'),
  ],
  ids=[
    'syntax',
    'train_field',
    'stage_field',
    'source_field',
    'layout',
    'lr_negative',
    'lr_nan',
    'end_lr_ratio',
    'warmup',
    'batch_size',
    'weight_decay',
    'loss_weight',
    'mesh',
    'model',
    'name_error',
    'no_get_config',
    'not_train_config',
  ],
)
def test_train_config_errors_name_file_and_line(capsys, tmp_path, body, line, message):
  path = config_file(tmp_path, body)
  got = error_line(capsys, 'train', '--config', path, '--run_dir', tmp_path / 'run')
  assert f'{path}:{line}: ' in got if line else f'{path}: ' in got
  assert message in got
  assert not (tmp_path / 'run').exists()


def test_train_checks_every_stage_source_before_step_0(capsys, tmp_path):
  body = edit(
    a=(
      '  return TrainConfig(model=ModelConfig.tiny(), stages=(stage,)',
      "  two = StageConfig('two', steps=2,\n"
      "                    sources=(SourceSpec(run_dir + '/../nope'),))\n"
      '  return TrainConfig(model=ModelConfig.tiny(), stages=(stage, two)',
    )
  )
  got = error_line(
    capsys, 'train', '--config', config_file(tmp_path, body), '--run_dir', tmp_path / 'run'
  )
  assert (
    "stage 'two': source 0: " in got
    and "nope' is not a prepared dataset: no summary.json" in got
    and 'run `flmjax data prepare MANIFEST OUT_DIR` first' in got
  )
  assert not (tmp_path / 'run').exists()  # nothing trained, nothing written
  body = edit(a=('random_data=True', "sources=('data/prepared',)"))
  got = error_line(
    capsys, 'train', '--config', config_file(tmp_path, body), '--run_dir', tmp_path / 'run'
  )
  assert "stage 'one': source 0 is a str; give a flmjax.data.pipeline.SourceSpec(path, ...)" in got


def test_train_flags(capsys, tmp_path):
  path = config_file(tmp_path, GOOD)
  assert '--stop-after 0 must be >= 1' in error_line(
    capsys, 'train', '--config', path, '--stop_after', '0'
  )
  (tmp_path / 'afile').write_text('keep me')
  assert 'afile is a file; pass another --run-dir' in error_line(
    capsys, 'train', '--config', path, '--run-dir', tmp_path / 'afile'
  )
  assert "argument --stop-after: invalid int value: 'x'" in error_line(
    capsys, 'train', '--config', path, '--stop-after', 'x'
  )
  np.save(tmp_path / 'codes.npy', np.zeros((8, 2)))
  assert 'a config is a Python file (.py) defining get_config(run_dir)' in error_line(
    capsys, 'train', '--config', tmp_path / 'codes.npy'
  )
  assert 'nope: no such checkpoint directory' in error_line(
    capsys,
    'train',
    '--config',
    path,
    '--run_dir',
    tmp_path / 'run',
    '--init_from',
    tmp_path / 'nope',
  )


def test_summary_keeps_every_stage_across_resumes(tmp_path):
  from flmjax.train.observe import write_summary

  write_summary(
    str(tmp_path),
    {'global_step': 3, 'eval': None, 'stages': [{'stage': 'one', 'steps_this_run': 3}]},
  )
  write_summary(
    str(tmp_path),
    {
      'global_step': 8,
      'eval': {'loss': 1.0},
      'stages': [{'stage': 'one', 'steps_this_run': 2}, {'stage': 'two', 'steps_this_run': 3}],
    },
  )
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['global_step'] == 8 and summary['eval'] == {'loss': 1.0}
  assert [(s['stage'], s['steps_this_run'], s['run']) for s in summary['stages']] == [
    ('one', 3, 1),
    ('one', 2, 2),
    ('two', 3, 2),
  ]


# ---- export ------------------------------------------------------------------------------------


@pytest.fixture
def orbax_run(tiny_model, tmp_path):
  """A training run directory holding one orbax checkpoint of the tiny model, whose config names
  a tokenizer.json (with a Hugging Face tokenizer_config.json beside it)."""
  from flmjax.checkpoint.checkpointer import Checkpointer
  from flmjax.train.config import StageConfig, TrainConfig, to_json
  from flmjax.train.state import TrainState

  tok_dir = tmp_path / 'tok'
  tok_dir.mkdir()
  (tok_dir / 'tokenizer.json').write_text('{"model": "stand-in"}')
  (tok_dir / 'tokenizer_config.json').write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
  ckpt = Checkpointer(str(tmp_path / 'run' / 'checkpoints'), use_async=False)
  params = nnx.to_pure_dict(nnx.state(tiny_model))
  tc = TrainConfig(
    model=tiny_model.cfg,
    stages=(StageConfig('a', 5, random_data=True),),
    run_dir=str(tmp_path / 'run'),
    tokenizer=str(tok_dir / 'tokenizer.json'),
  )
  ckpt.save(
    5,
    TrainState(params, {'count': jnp.zeros((), jnp.int32)}),
    {'model_config': to_json(tiny_model.cfg), 'train_config': to_json(tc)},
    force=True,
  )
  ckpt.close()
  return tmp_path / 'run'


def test_export_keeps_other_files_and_writes_tokenizer(capsys, orbax_run, tmp_path):
  out = tmp_path / 'official'
  out.mkdir()
  (out / 'README.md').write_text('my notes')
  (out / 'model-00001-of-00002.safetensors').write_text('a stale shard of an older export')
  line = error_line(capsys, 'export', orbax_run, out)
  assert (
    'exists; pass --overwrite to replace its checkpoint files (other files in it are kept)' in line
    and 'overwrite=True' not in line
  )
  rc, printed, err = run(capsys, 'export', orbax_run, out, '--overwrite', '--dtype', 'float32')
  assert rc == 0, err
  assert sorted(os.listdir(out)) == [
    'README.md',
    'config.json',
    'model.safetensors',
    'tokenizer.json',
    'tokenizer_config.json',
  ]
  assert (out / 'README.md').read_text() == 'my notes'
  assert json.loads((out / 'tokenizer_config.json').read_text()) == {
    'tokenizer_class': 'Qwen2Tokenizer'
  }
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['FLMAudioForCausalLM']
  import flmjax

  assert flmjax.load_official(str(out)).cfg.vocab_size == 320


def test_copy_tokenizer_kinds(tmp_path):
  """A SentencePiece model goes as tokenizer.model; a lone tokenizer.json gets the
  tokenizer_config.json that lets transformers' AutoTokenizer load it."""
  from flmjax.train.export import copy_tokenizer

  (tmp_path / 'sp.model').write_bytes(b'sp')
  (tmp_path / 'a').mkdir()
  assert copy_tokenizer(str(tmp_path / 'sp.model'), str(tmp_path / 'a')) == ['tokenizer.model']
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'tokenizer.json').write_text('{}')
  (tmp_path / 'b').mkdir()
  assert copy_tokenizer(str(tmp_path / 'hf' / 'tokenizer.json'), str(tmp_path / 'b')) == [
    'tokenizer.json',
    'tokenizer_config.json',
  ]
  assert json.loads((tmp_path / 'b' / 'tokenizer_config.json').read_text()) == {
    'tokenizer_class': 'PreTrainedTokenizerFast'
  }


def test_export_errors(capsys, orbax_run, tmp_path, tiny_dir):
  (tmp_path / 'afile').write_text('keep me')
  assert 'OUT_DIR' in error_line(capsys, 'export', orbax_run, tmp_path / 'afile')
  assert 'afile is a file; give a directory' in error_line(
    capsys, 'export', orbax_run, tmp_path / 'afile', '--overwrite'
  )
  assert (tmp_path / 'afile').read_text() == 'keep me'
  assert 'step 7' in error_line(capsys, 'export', orbax_run, tmp_path / 'o', '--step', '7')
  assert 'nothing: no such checkpoint directory' in error_line(
    capsys, 'export', tmp_path / 'nothing', tmp_path / 'o'
  )
  assert (
    'is an official checkpoint already (config.json); give a training run directory'
    in error_line(capsys, 'export', tiny_dir, tmp_path / 'o')
  )
  (tmp_path / 'empty').mkdir()
  assert 'empty: no training checkpoints here' in error_line(
    capsys, 'export', tmp_path / 'empty', tmp_path / 'o'
  )
  assert os.listdir(tmp_path / 'empty') == []
  for root, _, files in os.walk(orbax_run / 'checkpoints' / '5' / 'params'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  line = error_line(capsys, 'export', orbax_run, tmp_path / 'o')
  assert 'checkpoint' in line and str(orbax_run) in line and not (tmp_path / 'o').exists()


# ---- the model's public call, and the top level ---------------------------------------------


@pytest.mark.parametrize(
  'which, value, message',
  [
    ('text', 320, 'FLMAudio: text holds id 320, outside 0..319'),
    ('speak', 2049, 'FLMAudio: speak holds id 2049, outside 0..2048 (PAD)'),
    ('listen', -1, 'FLMAudio: listen holds id -1, outside 0..2048 (PAD)'),
    ('depth_prev', 2050, 'FLMAudio: depth_prev holds id 2050, outside 0..2049'),
  ],
  ids=['text', 'speak', 'listen', 'depth_prev'],
)
def test_model_rejects_out_of_vocab_ids(tiny_model, which, value, message):
  inputs = {
    'text': np.zeros((1, 3), np.int32),
    'speak': np.zeros((1, 3, 8), np.int32),
    'listen': np.zeros((1, 3, 8), np.int32),
    'depth_prev': np.zeros((1, 3, 7), np.int32),
  }
  inputs[which][0, -1, ...] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    tiny_model(**inputs)


def test_model_checks_shapes_and_is_free_under_jit(tiny_model):
  text, codes = np.zeros((1, 3), np.int32), np.zeros((1, 3, 8), np.int32)
  with pytest.raises(
    ValueError,
    match=r'speak must have shape \(1, 3, 8\) \(B, T, ...\), got '
    r'\(1, 8, 3\)',
  ):
    tiny_model(text, codes.transpose(0, 2, 1), codes)
  with pytest.raises(ValueError, match='text has dtype float32; token ids must be integers'):
    tiny_model(text.astype(np.float32), codes, codes)
  # Under jit the ids are tracers: no value check, no host sync, the same result.
  jitted = nnx.jit(lambda m, t, s, l: m(t, s, l).text_logits)
  np.testing.assert_allclose(
    np.asarray(jitted(tiny_model, text, codes, codes)),
    np.asarray(tiny_model(text, codes, codes).text_logits),
    atol=1e-6,
  )
  lowered = jax.jit(lambda t: tiny_model(t, codes, codes).text_logits).lower(text).as_text()
  assert 'reduce_min' not in lowered and 'reduce_max' not in lowered


def test_load_official_without_config_says_what_to_do(tmp_path, tiny_dir):
  import flmjax

  (tmp_path / 'model.safetensors').write_bytes((tiny_dir / 'model.safetensors').read_bytes())
  with pytest.raises(flmjax.CheckpointError, match='config.json not found beside the weights'):
    flmjax.load_official(str(tmp_path))


def test_chat_on_a_damaged_official_checkpoint(capsys, tmp_path, tiny_dir):
  np.save(tmp_path / 'user.npy', np.zeros((8, 2), np.int32))
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  (ckpt / 'config.json').write_text('{"vocab_size": 320,')
  (ckpt / 'model.safetensors').write_bytes((tiny_dir / 'model.safetensors').read_bytes()[:5000])
  chat = ('chat', '--checkpoint', ckpt, '--user', tmp_path / 'user.npy')
  assert f'{ckpt}/config.json: not a valid config.json' in error_line(capsys, *chat)
  (ckpt / 'config.json').write_text((tiny_dir / 'config.json').read_text())
  assert 'model.safetensors: truncated safetensors file' in error_line(capsys, *chat)


def test_unknown_command_and_main_flags(capsys):
  assert "unknown command 'trian'; use one of" in error_line(capsys, 'trian')
  assert 'unrecognized arguments: --bogus (see flmjax main --help)' in error_line(
    capsys, 'main', '--bogus'
  )
  assert 'config file nope.py not found' in error_line(capsys, 'main', '--config', 'nope.py')
