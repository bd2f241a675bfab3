"""JAX's paged-attention kernels in interpret mode against the XLA path (flmjax.model.paged):
the GPU kernel (jax.experimental.pallas.ops.gpu.paged_attention) on float32 and int8 pages and
through the golden greedy stream; the TPU kernel, whose only inexactness is its bfloat16 load
of every page (docs/decoding.md).

Ragged sessions in a 2-layer pool, GQA (4 query heads, 2 KV heads), head dim 16, pages of 8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from streams import run

from flmjax.decode import SamplingConfig, StreamingDecoder
from flmjax.model import paged as pg

K, N, H, NP, P, L = 2, 4, 16, 8, 8, 2
GREEDY = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)


def case():
  rng = np.random.default_rng(0)
  pool = {n: jnp.asarray(rng.normal(size=(K, L * NP, P, H)), jnp.float32) for n in ('k', 'v')}
  q = jnp.asarray(rng.normal(size=(3, 1, N, H)), jnp.float32)
  table = jnp.asarray([[3, 5, 0, 0], [1, 6, 2, 7], [4, 0, 0, 0]], jnp.int32) + NP  # layer 1
  count = jnp.asarray([13, 32, 1], jnp.int32)
  return q, pool, table, count


def kernel(kind, q, pool, table, count):
  return jax.jit(lambda *a: pg.attend_kernel(*a, kind=kind, interpret=True))(q, pool, table, count)


def err(a, b) -> float:
  return float(jnp.abs(a - b).max())


def test_gpu_kernel_in_interpret_mode_matches_the_xla_path():
  """float32 pages: within 1e-5 on outputs of scale 1 (measured 2.4e-7); int8 pages (the pool's
  own format, the kernel reading its scales) within 1e-5 of the XLA path on the same pages."""
  q, pool, table, count = case()
  want = pg.attend_xla(q, pool, table, count)
  assert err(kernel('gpu', q, pool, table, count), want) < 1e-5
  quantized = {}
  for name in ('k', 'v'):
    quantized[name], quantized[f'{name}_scale'] = pg.quantize(pool[name])
  want8 = pg.attend_xla(q, quantized, table, count)
  assert err(kernel('gpu', q, quantized, table, count), want8) < 1e-5
  assert err(want8, want) > 1e-3  # the int8 pages do differ from the float ones
  # The check can fail: one session's count off by a position changes its output.
  assert err(pg.attend_xla(q, pool, table, count.at[0].add(-1)), want) > 1e-2


def test_tpu_kernel_is_exact_on_pages_that_bfloat16_holds():
  """The TPU kernel loads every page as bfloat16 (float32 pages too), so on float32 pages it is
  off by bfloat16's rounding (measured 3.7e-3); on float32 pages holding bfloat16 values it
  matches the XLA path within 1e-5: the load is the whole difference."""
  q, pool, table, count = case()
  assert err(kernel('tpu', q, pool, table, count), pg.attend_xla(q, pool, table, count)) > 1e-3
  exact = {n: x.astype(jnp.bfloat16).astype(jnp.float32) for n, x in pool.items()}
  want = pg.attend_xla(q, exact, table, count)
  assert err(kernel('tpu', q, exact, table, count), want) < 1e-5


@pytest.mark.slow
def test_golden_stream_through_the_gpu_kernel(tiny_model, tiny_dir):
  """The golden model's greedy stream with the GPU kernel in interpret mode is the official
  out_plain, token for token (as the contiguous decoder's is)."""
  stream = np.load(tiny_dir / 'stream.npz')
  dec = StreamingDecoder(
    tiny_model, GREEDY, max_len=32, kv='paged', pages=12, page_size=P, paged_impl='gpu_interpret'
  )
  _, out = run(dec, dec.init(1), np.transpose(stream['user'], (2, 0, 1)))
  np.testing.assert_array_equal(out[:, 0], stream['out_plain'])
