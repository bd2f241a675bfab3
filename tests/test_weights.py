"""Issue 28: LoRA and the int8 base as transforms of the weights. The layers compute every weight
through flmjax.model.weights, on an array, an Int8Weight or a LoraWeight that lora.wrap and
int8.wrap build from a module's stored weights; the layers never name an adapter."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from flmjax.model import int8, lora
from flmjax.model import weights as W

MODEL = pathlib.Path(__file__).resolve().parents[1] / 'flmjax' / 'model'


def _stacked(key, L=3, i=8, o=6, r=2):
  k = jax.random.split(key, 4)
  w = jax.random.normal(k[0], (L, i, o))
  a = jax.random.normal(k[1], (L, i, r))
  b = jax.random.normal(k[2], (L, r, o))
  x = jax.random.normal(k[3], (4, i))
  return w, a, b, x


def test_wrap_builds_the_nodes_from_the_stored_weights():
  """`q` + `q_scale` -> Int8Weight; with `q_lora_a`/`q_lora_b` beside it -> LoraWeight over it;
  weights without either stay arrays, and no sibling is left under its own name."""
  rng = np.random.default_rng(0)  # plain numpy: wrap only regroups what it is given
  w, a, b, s = (rng.normal(size=shape) for shape in ((3, 8, 6), (3, 8, 2), (3, 2, 6), (3, 1, 6)))
  q = w.astype(np.int8)
  stored = {'q': q, 'q_scale': s, 'q_lora_a': a, 'q_lora_b': b, 'k': w, 'k_scale': s, 'v': w}
  got = lora.wrap(int8.wrap(stored), 0.5)
  assert sorted(got) == ['k', 'q', 'v']
  assert isinstance(got['q'], W.LoraWeight) and isinstance(got['q'].base, W.Int8Weight)
  assert got['q'].scale == 0.5 and got['q'].a is a and got['q'].b is b
  assert isinstance(got['k'], W.Int8Weight) and got['k'].q is w
  assert got['v'] is w


def test_dense_on_a_scanned_int8_lora_weight_is_the_dequantized_einsum_plus_the_low_rank_path():
  """A stacked LoraWeight over an Int8Weight, sliced by lax.scan a layer at a time, computes
  x @ (q * scale) + (x @ A) @ B * scale per layer (to float32 rounding, 1e-6 relative)."""
  w, a, b, x = _stacked(jax.random.key(1))
  q, s = int8.quantize(w, 'bio')
  node = W.LoraWeight(W.Int8Weight(q, s), a, b, 0.5, 0)

  def layer(h, wl):
    return h, W.dense('Bi,io->Bo', x, wl)

  _, got = jax.lax.scan(layer, x, node)
  want = jnp.einsum('Bi,Lio->LBo', x, q * s) + jnp.einsum('Bi,Lir,Lro->LBo', x, a, b) * 0.5
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # A slice taken through jax.tree.map (the depth MLP's codebook) slices every leaf alike.
  one = jax.tree.map(lambda t: t[1], node)
  np.testing.assert_allclose(W.dense('Bi,io->Bo', x, one), want[1], rtol=1e-6, atol=1e-6)
  assert W.dequantize(node, jnp.float32).shape == w.shape  # the base only: adapters not folded


def test_rows_adds_the_adapter_rows():
  """Embedding rows of a LoraWeight table: W[ids] + A[ids] @ B * scale."""
  table, a, b = (
    jax.random.normal(jax.random.key(k), s) for k, s in ((0, (10, 6)), (1, (10, 2)), (2, (2, 6)))
  )
  ids = jnp.array([[3, 0, 9]])
  got = W.rows(W.LoraWeight(table, a, b, 2.0), (ids,), jnp.float32)
  np.testing.assert_allclose(got, table[ids] + a[ids] @ b * 2.0, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(W.rows(table, (ids,), jnp.float32), table[ids])


def test_the_layers_never_name_an_adapter():
  """backbone, depth, loss, attention and layers import neither lora nor int8 and name no
  adapter, int8 scale or LoRA scale: those are the transforms' business."""
  for name in ('backbone', 'depth', 'loss', 'attention', 'layers'):
    src = (MODEL / f'{name}.py').read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, ast.ImportFrom):
        imported |= {f'{node.module}.{a.name}' for a in node.names} | {str(node.module)}
      elif isinstance(node, ast.Import):
        imported |= {a.name for a in node.names}
    assert not {'flmjax.model.lora', 'flmjax.model.int8'} & imported, name
    for word in ('_lora_a', '_lora_b', 'lora_scale', "_scale'", 'LoraParam', 'QuantScale'):
      assert word not in src, (name, word)
