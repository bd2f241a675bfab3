"""What the benchmarks share: timing a jitted call, the device's read bandwidth and matmul peak, and
the weight bytes a decoded frame must read (the floors the measured times are compared with)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats: int = 5) -> float:
  """Seconds of the fastest of `repeats` calls fn(*args), after one warm-up call (which compiles
  a jitted fn); each call is waited for."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def read_bandwidth(
  nbytes: int = 1 << 29, repeats: int = 7, dtype=jnp.bfloat16, best=False
) -> float:
  """Bytes/s of a jitted full read (a float32 sum) of an nbytes array: the median run, which a
  shared machine's changing load moves less than the fastest (best=True: the fastest, the
  machine's limit as a roofline wants it)."""
  itemsize = jnp.dtype(dtype).itemsize
  x = jnp.ones((nbytes // itemsize // 1024, 1024), dtype)
  total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  jax.block_until_ready(total(x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(total(x))
    times.append(time.perf_counter() - t)
  return x.size * itemsize / float(np.min(times) if best else np.median(times))


class MatmulPeak:
  """FLOP/s of a big square matmul: the practical peak of this machine. Sampled right after each
  timed step too, so a shared machine's changing load affects both sides of the ratio alike."""

  def __init__(self, n: int = 2048, dtype=jnp.float32):
    self.n = n
    self.a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    self.b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    self.f = jax.jit(lambda a, b: a @ b)
    self.f(self.a, self.b).block_until_ready()

  def sample(self, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      self.f(self.a, self.b).block_until_ready()
      times.append(time.perf_counter() - t)
    return 2 * self.n**3 / min(times)


def frame_weight_bytes(model) -> tuple[int, int]:
  """(all parameter bytes, bytes a decoded frame must read): the embedding tables contribute only
  the rows a frame gathers (1 text + 16 audio backbone rows, 8 depth rows)."""
  from flax import nnx  # here: bench_attention.py runs without flax

  cfg = model.cfg
  leaves = {'/'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  total = sum(x.size * x.dtype.itemsize for x in leaves.values())
  tables = (
    'backbone/text_embed',
    'backbone/speak_embed',
    'backbone/listen_embed',
    'depth_transformer/wtes',
  )
  itemsize = leaves['backbone/lm_head'].dtype.itemsize
  rows = (1 + 2 * cfg.num_codebooks) * cfg.hidden_size + cfg.num_codebooks * cfg.depth_dim
  per_frame = total - sum(leaves[t].size * itemsize for t in tables) + rows * itemsize
  return total, per_frame


def depth_weight_bytes(cfg) -> dict:
  """Bytes of depth-transformer weights one frame reads: each once ('once'), and with q/k/v/proj
  re-read by every one of the C steps ('per_step')."""
  it = jnp.dtype(cfg.compute_dtype).itemsize
  L, C, D, d, f = (
    cfg.depth_layers,
    cfg.num_codebooks,
    cfg.hidden_size,
    cfg.depth_dim,
    cfg.depth_mlp_dim,
  )
  shared = L * (4 * d * d + 2 * d)  # qkv, proj, two norms: read by every step
  mlps = L * C * 3 * d * f  # step c reads only codebook c's MLP
  outside = D * C * d + C * d * cfg.audio_vocab_size + C * d + d  # linear_in, heads, wpe, ln_f
  return {'once': it * (shared + mlps + outside), 'per_step': it * (C * shared + mlps + outside)}


def train_setup(cfg, batch: int, window: int, stage=None, run_dir: str = '/tmp/bench', **kw):
  """A one-device train step as the benchmarks build it -> (tc, mesh, spec, state, loader):
  `stage` defaults to 10 steps of random data, `kw` sets any other TrainConfig field. The
  loader is the stage's; `global_batch(loader, mesh)` places its next batch."""
  from flmjax import sharding as shd  # here: bench_attention.py runs without flax
  from flmjax.train import data as data_lib
  from flmjax.train import state as st
  from flmjax.train.config import StageConfig, TrainConfig

  stage = stage or StageConfig('bench', 10, random_data=True)
  tc = TrainConfig(
    model=cfg, stages=(stage,), run_dir=run_dir, window=window, batch_size=batch, **kw
  )
  mesh = shd.make_mesh(1, 1, 1)
  spec = st.state_spec(tc, mesh)
  return tc, mesh, spec, st.init_state(spec, tc), data_lib.make_stage_loader(tc, 0)


def global_batch(loader, mesh):
  """The loader's next batch, placed on the mesh as the train step takes it."""
  from flmjax.train import data as data_lib
  from flmjax.train import step as sp

  return data_lib.to_global(next(loader), sp.batch_shardings(mesh))
