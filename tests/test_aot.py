"""`flmjax aot`: the small preset's train step and decode frame compiled for v5e:2x2 with the real
TPU compiler (libtpu, from the test extra), FSDP without global-batch collectives, and the
mesh validation errors."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from flmjax import cli
from flmjax import sharding as shd
from flmjax.aot.compile import collectives_carrying, compile_report, required_bytes
from flmjax.aot.request import AotError, AotRequest, make_request, parse_mesh
from flmjax.config import ModelConfig

pytestmark = pytest.mark.slow  # TPU compiles with libtpu

KEYS = [
  'topology',
  'chip',
  'chips',
  'mesh',
  'step',
  'window',
  'batch',
  'hbm_gib',
  'args_gib',
  'temp_gib',
  'out_gib',
  'alias_gib',
  'peak_gib',
  'fits',
  'compile_s',
  'collectives',
]
DECODE_KEYS = [
  'largest_collective_mib',
  'read_gib_per_chip',
  'hbm_gbps',
  'frame_ms_estimate',
  'pallas',
  'kv_pages',
  'page_size',
  'kv_dtype',
]
TRAIN_KEYS = ['trainable_params', 'trainable_gib', 'base_dtype']
ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, WINDOW = 8, 96  # (8, 95) and 8 * 95 = 760 rows appear in no weight's shape


@pytest.fixture(scope='module')
def small_train():
  req = AotRequest(
    'v5e:2x2', ModelConfig.small(), step='train', window=WINDOW, batch=BATCH, fsdp=4, remat='full'
  )
  return compile_report(req, log=lambda *a: None)


def test_small_train_step_fits_v5e(small_train):
  record, _ = small_train
  assert list(json.loads(json.dumps(record))) == KEYS + TRAIN_KEYS
  assert record['base_dtype'] is None and record['trainable_params'] > 90_000_000
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
  code = cli.main(
    [
      'aot',
      '--topology',
      'v5e:2x2',
      '--preset',
      'small',
      '--step',
      'decode',
      '--window',
      '256',
      '--batch',
      '2',
      '--mesh',
      'tensor=4',
    ]
  )
  lines = capsys.readouterr().out.strip().splitlines()
  record = json.loads(lines[-1])
  assert code == 0 and list(record) == KEYS + DECODE_KEYS
  assert record['fits'] and record['step'] == 'decode' and record['window'] == 256
  # The frame's collectives are per-layer activations ([2,1,D] all-reduces), looked-up rows and
  # sampling candidates: nothing the size of a weight, the logits or the KV cache (1 MiB; it was
  # gathered while the small preset's 2 KV heads could not split over tensor=4).
  assert 0 < record['largest_collective_mib'] < 0.1
  assert record['hbm_gbps'] == 819.0
  assert record['frame_ms_estimate'] == pytest.approx(
    record['read_gib_per_chip'] * 2**30 / 819e9 * 1e3, abs=0.01
  )
  # A frame reads every weight and the whole cache: at least the arguments less the lookup
  # tables' unread rows, at most the arguments plus the depth attention re-reads.
  assert 0.5 * record['args_gib'] < record['read_gib_per_chip'] < 2 * record['args_gib']
  assert record['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 4}
  assert (record['kv_pages'], record['page_size'], record['kv_dtype']) == (None, None, 'bf16')
  assert len(lines) > 1  # progress came first


def test_cli_without_libtpu_says_how_to_install(monkeypatch, capsys):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'libtpu' else real(name, *a)
  )
  assert cli.main(['aot', '--topology', 'v5e:2x2', '--preset', 'small']) == 1
  out = capsys.readouterr()
  err = out.err.strip().splitlines()
  assert out.out == '' and len(err) == 1
  assert err[0].startswith('flmjax aot: error: ') and 'pip install -e ".[tpu]"' in err[0]


def test_mesh_errors_are_named():
  with pytest.raises(
    shd.ShardingError,
    match=r'tensor=8 does not divide the model\'s 28 query '
    r'heads; valid tensor sizes: 1, 2, 4, 7, 14, 28',
  ):
    shd.validate_mesh(ModelConfig.flm_8b(), {'data': 1, 'fsdp': 8, 'tensor': 8})
  shd.validate_mesh(ModelConfig.flm_8b(), {'data': 1, 'fsdp': 16, 'tensor': 4})
  mesh = AbstractMesh((1, 3, 8), shd.MESH_AXES)
  with pytest.raises(
    shd.ShardingError,
    match=r"logical axis 'embed' of size 64 does not divide "
    r'over mesh axes fsdp=3 = 3',
  ):
    shd.logical_to_spec(('embed', 'mlp'), (64, 160), mesh)
  # Fewer KV heads (4) than tensor shards (8): replicated on purpose, as usual for GQA.
  assert shd.logical_to_spec(('embed', 'kv_heads', 'head_dim'), (3 * 4, 4, 128), mesh) == P(
    'fsdp', None, None
  )
  with pytest.raises(AotError, match='fsdp and tensor'):
    parse_mesh('fsdp=16,model=4')
  assert parse_mesh('fsdp=16,tensor=4') == {'fsdp': 16, 'tensor': 4}
  with pytest.raises(
    AotError, match='64 chips of v5p:4x4x4 are not a multiple of fsdp\\*tensor = 48'
  ):
    compile_report(AotRequest('v5p:4x4x4', ModelConfig.flm_8b(), fsdp=16, tensor=3))


@pytest.mark.slow
def test_decode_frame_with_the_pallas_kernel_under_the_mesh_compiles_for_v5e():
  """The Mosaic depth kernel in shard_map over the sessions, through the real TPU compiler: the
  kernel is in the program and no collective moves a depth weight (they are stored whole)."""
  from flmjax.aot.request import make_request

  cfg = ModelConfig.small()
  req = make_request(
    'v5e:2x2', 4, step='decode', preset='small', window=256, batch=8, mesh='tensor=4', pallas=True
  )
  record, compiled = compile_report(req, log=lambda *a: None)
  assert record['fits'] and record['pallas']
  hlo = compiled.as_text()
  assert 'tpu_custom_call' in hlo
  mlp = cfg.replace(tensor_parallel=4).padded_depth_mlp_dim
  assert collectives_carrying(hlo, (cfg.depth_dim, mlp)) == []
  assert collectives_carrying(hlo, (mlp, cfg.depth_dim)) == []
  assert record['largest_collective_mib'] < 0.1
  with pytest.raises(AotError, match='`step` decode only'):
    make_request('v5e:2x2', 4, step='train', preset='small', pallas=True)


@pytest.mark.slow
def test_paged_decode_frame_with_jax_paged_attention_compiles_for_v5e():
  """--kv-pages: the frame over a page pool, JAX's TPU paged-attention kernel in the program, the
  pool (not sessions x window) in the arguments, and the paged fields in the record. The kernel
  tiles head_dim by 128 (the 8B's), so the small preset gets 4 heads of 128, one KV head a chip."""
  cfg = ModelConfig.small(num_heads=4, num_kv_heads=4, head_dim=128)
  req = AotRequest('v5e:2x2', cfg, step='decode', window=256, batch=8, tensor=4)
  paged, compiled = compile_report(
    dataclasses.replace(req, kv_pages=8, page_size=128), log=lambda *a: None
  )
  contiguous, _ = compile_report(req, log=lambda *a: None)
  assert paged['fits'] and (paged['kv_pages'], paged['page_size']) == (8, 128)
  hlo = compiled.as_text()
  assert 'tpu_custom_call' in hlo
  # The 8 codebooks' embedding rows are summed where their tables live (split by codebook): one
  # [B,1,D] all-reduce, never the [B,8,D] rows gathered (14 MiB a frame for the 8B at B=256).
  assert collectives_carrying(hlo, (8, cfg.num_codebooks, cfg.hidden_size)) == []
  # 8 pages of 128 hold half of 8 sessions x 256 positions: the pool is what the cache costs.
  assert paged['args_gib'] < contiguous['args_gib']


def test_collective_sizes_read_the_largest_array_of_each_collective():
  from flmjax.aot.roofline import collective_sizes, largest_collective_mib

  hlo = '\n'.join(
    [
      '%ag = bf16[64,8,3584]{2,0,1} all-gather(bf16[64,2,3584]{2,0,1} %x), channel_id=1',
      '%ar-start = (f32[4,1024]{1,0}, f32[4,1024]{1,0}) all-reduce-start(f32[4,1024]{1,0} %y)',
      '%ar-done = f32[4,1024]{1,0} all-reduce-done(%ar-start)',
      '%f = f32[1024,1024]{1,0} fusion(%z), kind=kLoop',
    ]
  )
  assert [(k, b) for k, b, _ in collective_sizes(hlo)] == [
    ('all-gather', 64 * 8 * 3584 * 2),
    ('all-reduce', 4 * 1024 * 4),
  ]
  assert largest_collective_mib(hlo) == 3.5
  assert largest_collective_mib('') == 0


def test_required_bytes_parses_the_compiler_message():
  msg = (
    'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory '
    'space hbm. Used 203.35G of 95.74G hbm. Exceeded hbm capacity by 107.61G.'
  )
  assert required_bytes(msg) == int(203.35 * 2**30)
  msg = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
    'temporaries (33.36G) exceeds available HBM (15.75G).'
  )  # the full 8B fine-tune, v5e:2x2
  assert required_bytes(msg) == int(33.36 * 2**30)
  assert required_bytes('RESOURCE_EXHAUSTED: out of memory') is None


def test_sharding_report_bytes_per_device():
  from flmjax.train.config import StageConfig, TrainConfig
  from flmjax.train.state import state_spec

  tc = TrainConfig(
    model=ModelConfig.tiny(), stages=(StageConfig('s', 1, random_data=True),), run_dir=''
  )
  spec = state_spec(tc, shd.make_mesh(2, 2, 2))
  lines = shd.sharding_report(
    spec.abstract.params, spec.shardings.params, spec.abstract.opt_state, spec.shardings.opt_state
  )
  q = next(l for l in lines if l.split()[0] == 'backbone/q')
  # q [L=2, D=64, N=4, H=16] float32, D over fsdp=2 and N over tensor=2: 8 KiB a device.
  assert 'P(None, fsdp, tensor, None)' in q and f'{2 * 64 * 4 * 16 * 4 / 4 / 2**20:.2f} MiB' in q
  assert lines[-1].startswith('  optimizer state:')


def test_cli_on_cpu_host_with_libtpu_is_quiet(golden_dir):
  """libtpu installed, no TPU: the CLI pins JAX to the CPU, so nothing probes for a TPU, even
  though importing flmjax has imported jax already (as every command does)."""
  import importlib.util

  assert importlib.util.find_spec('libtpu') is not None, 'the test extra installs libtpu'
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  code = (
    'import sys, flmjax.cli, jax; assert "jax" in sys.modules; '
    f'rc = flmjax.cli.main(["main", "--parity", "--golden", {str(golden_dir)!r}]); '
    'print(jax.devices()[0].platform); sys.exit(rc)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300
  )
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
  req = make_request('v5p:4x4x4', 64, config=path)
  assert (req.model, req.window, req.batch, req.fsdp, req.tensor, req.remat) == (
    ModelConfig.flm_8b(),
    4096,
    64,
    64,
    1,
    'full',
  )


@pytest.mark.slow
def test_lora_int8_step_reads_the_int8_base():
  """`--lora-rank 8 --base-dtype int8`, tiny preset, one v5e chip (TPU compiler): the step's
  arguments hold every stacked base matrix as int8 (its per-channel scales beside it), no bf16
  or f32 array of a whole stack exists anywhere in the compiled program (each layer's slice is
  dequantized inside the layer loop), and the arguments are smaller than with a bf16 base."""
  import re

  from flmjax.model.int8 import QUANTIZED
  from flmjax.train.state import state_spec

  req = make_request(
    'v5e:1x1', 1, preset='tiny', window=WINDOW, batch=2, lora_rank=8, base_dtype='int8'
  )
  record, compiled = compile_report(req, log=lambda *a: None)
  assert record['fits'] and record['base_dtype'] == 'int8'
  cfg = req.model
  K, D, F, H = cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = 8 * (4 * D + 2 * cfg.num_heads * H + 2 * K * H) + 8 * 3 * (D + F)  # attn + mlp
  assert record['trainable_params'] == cfg.num_layers * per_layer
  hlo = compiled.as_text()
  entry = next(line for line in hlo.splitlines() if line.startswith('ENTRY'))
  from flmjax.aot.compile import abstract_mesh_for, topology_devices
  from flmjax.train.config import StageConfig, TrainConfig

  tc = TrainConfig(
    model=cfg, stages=(StageConfig('a', 1, random_data=True),), run_dir='', lora=req.lora
  )
  base = state_spec(tc, abstract_mesh_for(req, topology_devices(req.topology))).base
  for module, name, _ in QUANTIZED:
    shape = ','.join(map(str, base[module][name].shape))
    assert re.search(rf'base__{module}____{name}__\.\d+: s8\[{shape}\]', entry), name
    assert not re.search(rf'(bf16|f32)\[{shape}\]', hlo), name
  bf16 = make_request('v5e:1x1', 1, preset='tiny', window=WINDOW, batch=2, lora_rank=8)
  assert compile_report(bf16, log=lambda *a: None)[0]['args_gib'] > record['args_gib']


@pytest.mark.parametrize(
  'argv, match',
  [
    (['--base-dtype', 'int8'], '--base-dtype needs --lora-rank R'),
    (['--lora-targets', 'attn'], '--lora-targets needs --lora-rank R'),
    (['--lora-rank', '0'], 'LoRA: LoraConfig.rank is 0'),
    (['--lora-rank', '4', '--lora-targets', 'attn,ffn'], "unknown target 'ffn'"),
  ],
)
def test_cli_bad_lora_flags(argv, match, capsys):
  code = cli.main(['aot', '--topology', 'v5e:1x1', '--preset', 'tiny'] + argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and len(err) == 1 and match in err[0], err


def test_paged_decode_flags_are_checked():
  req = make_request(
    'v5e:2x2', 4, step='decode', preset='small', window=256, batch=8, kv_pages=16, page_size=64
  )
  assert (req.kv_pages, req.page_size, req.kv_dtype) == (16, 64, 'bf16')
  with pytest.raises(AotError, match='a paged KV cache is for `step` decode'):
    make_request('v5e:2x2', 4, step='train', preset='small', kv_pages=16)
  with pytest.raises(AotError, match='need `kv_pages` N'):
    make_request('v5e:2x2', 4, step='decode', preset='small', kv_dtype='int8')
  with pytest.raises(AotError, match='`window` 200 is not a multiple of `page_size` 128'):
    make_request('v5e:2x2', 4, step='decode', preset='small', window=200, kv_pages=4)
