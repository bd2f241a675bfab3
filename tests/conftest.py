"""Test configuration: 8 simulated CPU devices (set before jax is imported), the two tiers, and
the fixtures shared across files.

Tiers: `pytest tests` runs the fast tier (tests not marked `@pytest.mark.slow`, a few minutes);
`pytest --full tests` runs everything, as `.ci/run` does. Naming test files or tests
(`pytest tests/test_serve.py -k idle`) runs what is named, slow or not, and an explicit
`-m EXPR` selects by marker instead (`-m slow`: the slow tier alone)."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'golden'  # the official PyTorch code's outputs (golden/README.md)


@pytest.fixture(scope='session')
def golden_dir():
  if not GOLDEN.exists():
    pytest.fail(f'golden fixtures not found at {GOLDEN}')
  return GOLDEN


@pytest.fixture(scope='session')
def tiny_dir(golden_dir):
  return golden_dir / 'flm_tiny'


@pytest.fixture(scope='session')
def tiny_model(tiny_dir):
  import flmjax

  return flmjax.load_official(str(tiny_dir), dtype='float32')


def random_data_config(run_dir, **kw):
  """The tiny model's two-stage run on random grids that the training tests share
  (test_train_loop.py, test_train_faults.py): one set of shapes, so the jitted step compiles
  once per session. kw overrides TrainConfig fields."""
  from flmjax.config import ModelConfig
  from flmjax.train.config import MeshConfig, OptimConfig, StageConfig, TrainConfig

  stages = (
    StageConfig('a', 3, random_data=True, peak_lr=3e-3, warmup_steps=1),
    StageConfig('b', 2, random_data=True, peak_lr=1e-3),
  )
  base = dict(
    model=ModelConfig.tiny(),
    stages=stages,
    run_dir=str(run_dir),
    window=12,
    batch_size=8,
    compute_dtype='float32',
    optim=OptimConfig(eps=1e-3),
    mesh=MeshConfig(2, 2, 2),
    checkpoint_every=2,
    log_every=1,
    progress_bar=False,
  )
  return TrainConfig(**{**base, **kw})


@pytest.fixture
def seed():
  """The random kernel tests' seed: fixed, so every run draws the same inputs; KERNEL_TEST_SEED
  tries another (printed, so a failure can be replayed)."""
  value = int(os.environ.get('KERNEL_TEST_SEED', '0'))
  print(f'KERNEL_TEST_SEED={value}')
  return value


def pytest_addoption(parser):
  parser.addoption(
    '--full', action='store_true', help='the full tier: the slow tests too (what .ci/run runs)'
  )


# Session fixtures that take long to build: a test that uses one is in the slow tier.
SLOW_FIXTURES = ('serve_pipeline',)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if any(name in getattr(item, 'fixturenames', ()) for name in SLOW_FIXTURES):
      item.add_marker(pytest.mark.slow)
  named = any(not pathlib.Path(arg.split('::')[0]).is_dir() for arg in config.args)
  if config.getoption('--full') or config.getoption('-m') or named:
    return
  slow = [item for item in items if item.get_closest_marker('slow')]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker('slow')]


def pytest_configure(config):
  assert jax.device_count() == 8, 'tests expect 8 simulated CPU devices'


@pytest.fixture(scope='session')
def serve_pipeline(tiny_model, golden_dir):
  """The server's batched frame computation on the tiny LM and golden mimi_small: 4 slots,
  greedy (so every session's output is a function of its input), compiled once."""
  from flmjax.codec import load_mimi
  from flmjax.decode import SamplingConfig
  from flmjax.serve.pipeline import FramePipeline

  pipeline = FramePipeline(
    tiny_model,
    load_mimi(str(golden_dir / 'mimi_small')),
    4,
    sampling=SamplingConfig(greedy=True),
    max_len=256,
  )
  pipeline.warmup()
  return pipeline
