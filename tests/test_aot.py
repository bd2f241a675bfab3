"""`flmjax aot`: the small preset's train step and decode frame compiled for v5e:2x2 with the real
TPU compiler (libtpu, from the test extra), FSDP without global-batch collectives, and the
mesh validation errors."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from flmjax import sharding as shd
from flmjax.aot import cli as aot_cli
from flmjax.aot.compile import (AotError, AotRequest, collectives_carrying, compile_report,
                                parse_mesh, required_bytes)
from flmjax.config import ModelConfig

KEYS = ['topology', 'chip', 'chips', 'mesh', 'step', 'window', 'batch', 'hbm_gib', 'args_gib',
        'temp_gib', 'out_gib', 'alias_gib', 'peak_gib', 'fits', 'compile_s', 'collectives']
ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, WINDOW = 8, 96  # (8, 95) and 8 * 95 = 760 rows appear in no weight's shape


@pytest.fixture(scope='module')
def small_train():
  req = AotRequest('v5e:2x2', ModelConfig.small(), step='train', window=WINDOW, batch=BATCH,
                   fsdp=4, remat='full')
  return compile_report(req, log=lambda *a: None)


def test_small_train_step_fits_v5e(small_train):
  record, _ = small_train
  assert list(json.loads(json.dumps(record))) == KEYS
  assert record['fits'] and record['chips'] == 4 and record['hbm_gib'] == 16.0
  assert record['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  peak = record['args_gib'] + record['out_gib'] - record['alias_gib'] + record['temp_gib']
  assert abs(record['peak_gib'] - peak) < 2e-3
  assert 0 < record['peak_gib'] < 0.9 * 16


def test_fsdp_no_collective_carries_the_global_batch(small_train):
  """FSDP moves weights, not activations: every activation stays batch-sharded (2 rows a chip)."""
  record, compiled = small_train
  hlo = compiled.as_text()
  assert sum(record['collectives'].values()) > 0  # the weights do move
  assert collectives_carrying(hlo, (BATCH, WINDOW - 1)) == []
  assert collectives_carrying(hlo, (BATCH * (WINDOW - 1),)) == []  # depth rows N = B*T
  # The helper does find such a shape when one is there.
  line = '%ar = bf16[8,95,512]{2,1,0} all-reduce(bf16[8,95,512]{2,1,0} %x), replica_groups={}'
  assert collectives_carrying(line, (BATCH, WINDOW - 1)) == [line]


def test_cli_small_decode_frame_fits_v5e(capsys):
  code = aot_cli.main(['--topology', 'v5e:2x2', '--preset', 'small', '--step', 'decode',
                       '--window', '256', '--batch', '2', '--mesh', 'tensor=4'])
  lines = capsys.readouterr().out.strip().splitlines()
  record = json.loads(lines[-1])
  assert code == 0 and list(record) == KEYS
  assert record['fits'] and record['step'] == 'decode' and record['window'] == 256
  assert record['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 4}
  assert len(lines) > 1  # progress came first


def test_cli_without_libtpu_says_how_to_install(monkeypatch, capsys):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  assert aot_cli.main(['--topology', 'v5e:2x2', '--preset', 'small']) == 1
  out = capsys.readouterr()
  err = out.err.strip().splitlines()
  assert out.out == '' and len(err) == 1
  assert err[0].startswith('flmjax aot: error: ') and 'pip install -e ".[tpu]"' in err[0]


def test_mesh_errors_are_named():
  with pytest.raises(shd.ShardingError, match=r'tensor=8 does not divide the model\'s 28 query '
                     r'heads; valid tensor sizes: 1, 2, 4, 7, 14, 28'):
    shd.validate_mesh(ModelConfig.flm_8b(), {'data': 1, 'fsdp': 8, 'tensor': 8})
  shd.validate_mesh(ModelConfig.flm_8b(), {'data': 1, 'fsdp': 16, 'tensor': 4})
  mesh = AbstractMesh((1, 3, 8), shd.MESH_AXES)
  with pytest.raises(shd.ShardingError, match=r"logical axis 'embed' of size 64 does not divide "
                     r'over mesh axes fsdp=3 = 3'):
    shd.logical_to_spec(('embed', 'mlp'), (64, 160), mesh)
  # Fewer KV heads (4) than tensor shards (8): replicated on purpose, as usual for GQA.
  assert shd.logical_to_spec(('embed', 'kv_heads', 'head_dim'), (3 * 4, 4, 128), mesh) == \
      P('fsdp', None, None)
  with pytest.raises(AotError, match='fsdp and tensor'):
    parse_mesh('fsdp=16,model=4')
  assert parse_mesh('fsdp=16,tensor=4') == {'fsdp': 16, 'tensor': 4}
  with pytest.raises(AotError, match='64 chips of v5p:4x4x4 are not a multiple of fsdp\\*tensor '
                     '= 48'):
    compile_report(AotRequest('v5p:4x4x4', ModelConfig.flm_8b(), fsdp=16, tensor=3))


def test_required_bytes_parses_the_compiler_message():
  msg = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory '
         'space hbm. Used 203.35G of 95.74G hbm. Exceeded hbm capacity by 107.61G.')
  assert required_bytes(msg) == int(203.35 * 2 ** 30)


def test_sharding_report_bytes_per_device():
  from flmjax.train.config import StageConfig, TrainConfig
  from flmjax.train.state import state_spec
  tc = TrainConfig(model=ModelConfig.tiny(), stages=(StageConfig('s', 1, random_data=True),),
                   run_dir='')
  spec = state_spec(tc, shd.make_mesh(2, 2, 2))
  lines = shd.sharding_report(spec.abstract.params, spec.shardings.params,
                              spec.abstract.opt_state, spec.shardings.opt_state)
  q = next(l for l in lines if l.split()[0] == 'backbone/q')
  # q [L=2, D=64, N=4, H=16] float32, D over fsdp=2 and N over tensor=2: 8 KiB a device.
  assert "P(None, fsdp, tensor, None)" in q and f'{2 * 64 * 4 * 16 * 4 / 4 / 2**20:.2f} MiB' in q
  assert lines[-1].startswith('  optimizer state:')


def test_cli_on_cpu_host_with_libtpu_is_quiet(golden_dir):
  """libtpu installed, no TPU: the CLI pins JAX to the CPU, so nothing probes for a TPU, even
  though importing flmjax has imported jax already (as every command does)."""
  import importlib.util
  assert importlib.util.find_spec('libtpu') is not None, 'the test extra installs libtpu'
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  code = ('import sys, flmjax.cli, jax; assert "jax" in sys.modules; '
          f'rc = flmjax.cli.main(["main", "--parity", "--golden", {str(golden_dir)!r}]); '
          'print(jax.devices()[0].platform); sys.exit(rc)')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith('cpu'), out.stdout + out.stderr
  assert 'TPU' not in out.stderr and 'libtpu' not in out.stderr, out.stderr


def test_pod_config_gives_the_aot_request():
  """experiments/configs/flm8b_pod.py: what `flmjax aot --config` compiles (the 8B compile
  itself is too slow for CI; experiments/RESULTS.md has its numbers)."""
  from flmjax.train.config import load_config_file
  path = str(ROOT / 'experiments' / 'configs' / 'flm8b_pod.py')
  tc = load_config_file(path, '/nonexistent/run')
  assert tc.init_from and tc.window == 4096 and tc.compute_dtype == 'bfloat16'
  assert [s.name for s in tc.stages] == ['asr_tts', 'duplex']
  args = aot_cli._parser().parse_args(['--topology', 'v5p:4x4x4', '--config', path])
  req = aot_cli._request(args, 64)
  assert (req.model, req.window, req.batch, req.fsdp, req.tensor, req.remat) == \
      (ModelConfig.flm_8b(), 4096, 64, 64, 1, 'full')
