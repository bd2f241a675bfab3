"""Test configuration: 8 simulated CPU devices, set before jax is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / 'shared' / 'golden'
if not GOLDEN.exists():
  GOLDEN = ROOT / 'shared' / 'golden'


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


def pytest_configure(config):
  assert jax.device_count() == 8, 'tests expect 8 simulated CPU devices'


@pytest.fixture(scope='session')
def serve_pipeline(tiny_model, golden_dir):
  """The server's batched frame computation on the tiny LM and golden mimi_small: 4 slots,
  greedy (so every session's output is a function of its input), compiled once."""
  from flmjax.codec import load_mimi
  from flmjax.decode import SamplingConfig
  from flmjax.serve.pipeline import FramePipeline
  pipeline = FramePipeline(tiny_model, load_mimi(str(golden_dir / 'mimi_small')), 4,
                           sampling=SamplingConfig(greedy=True), max_len=256)
  pipeline.warmup()
  return pipeline
