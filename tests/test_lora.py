"""Issue 18: LoRA adapters and the int8 base as transforms of the model's weights (issue 28);
the LoRA train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flmjax
from flmjax import sharding as shd
from flmjax.config import ModelConfig
from flmjax.model import int8, transforms
from flmjax.model import lora as L
from flmjax.model import weights as W
from flmjax.model.flm import FLMAudio, abstract
from flmjax.train import data as data_lib
from flmjax.train import state as st
from flmjax.train import step as sp
from flmjax.train.config import OptimConfig, StageConfig, TrainConfig

ALL = L.LoraConfig(rank=4, alpha=8.0, targets=L.TARGETS, base_dtype='float32')


@pytest.fixture(scope='module')
def inputs(tiny_dir):
  d = np.load(tiny_dir / 'forward.npz')
  return dict(
    text=d['text'], speak=d['speak'], listen=d['listen'], depth_prev=d['depth_tokens'][..., :7]
  )


def lora_model(base_model, lc, seed=1, noise=0.0):
  """base_model's weights (stored in lc.base_dtype) with adapters; B = noise * N(0, 1)."""
  graphdef, _ = nnx.split(abstract(base_model.cfg, lc))
  base = int8.cast_base(nnx.to_pure_dict(nnx.state(base_model)), lc.base_dtype)
  model = FLMAudio(base_model.cfg, rngs=nnx.Rngs(params=seed), lora=lc)
  key = jax.random.key(seed)
  for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, L.LoraParam))):
    # Adapters stay zero over the layout padding (L.real_mask), as in training.
    mask = L.real_mask(v.shape, v.get_metadata()['axes'], base_model.cfg)
    v.set_value(
      v.get_value() + noise * mask * jax.random.normal(jax.random.fold_in(key, i), v.shape)
    )
  _, adapters = L.split_params(nnx.to_pure_dict(nnx.state(model)))
  return nnx.merge(graphdef, transforms.join(base, adapters))


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.slow
def test_zero_b_equals_the_base_exactly(tiny_model, inputs):
  """Every target group, float32: with B = 0 the logits are the base model's, bit for bit."""
  base, ours = tiny_model(**inputs), lora_model(tiny_model, ALL)(**inputs)
  np.testing.assert_array_equal(ours.text_logits, base.text_logits)
  np.testing.assert_array_equal(ours.depth_logits, base.depth_logits)


@pytest.mark.slow
def test_adapters_change_the_forward_and_merge_exactly(tiny_model, inputs, tmp_path):
  """B != 0: the merged model, saved in the official layout and read back by load_official,
  gives the unmerged forward's logits (float32, <= 1e-5 relative); every group matters."""
  model = lora_model(tiny_model, ALL, noise=0.05)
  ours = model(**inputs)
  out = flmjax.save_official(transforms.merge(model), str(tmp_path / 'merged'))
  merged = flmjax.load_official(out, dtype='float32')(**inputs)
  assert rel(merged.text_logits, ours.text_logits) <= 1e-5
  assert rel(merged.depth_logits, ours.depth_logits) <= 1e-5
  base = tiny_model(**inputs)
  assert rel(ours.text_logits, base.text_logits) > 1e-2
  for target in L.TARGETS:  # each group alone moves the logits
    one = lora_model(tiny_model, dataclasses.replace(ALL, targets=(target,)), noise=0.05)
    o = one(**inputs)
    assert max(rel(o.text_logits, base.text_logits), rel(o.depth_logits, base.depth_logits)) > 1e-3


# Run in a subprocess outside the repository: transformers (which peft imports) imports the
# Hugging Face `kernels` package when it is installed, and the repository's own kernels/
# directory would shadow it on a path that starts at the repository root.
PEFT_MERGE = """
import sys
import peft
import torch
from safetensors.torch import load_file, save_file


def official_tree(sd):
    # A torch module tree with the official FLM-Audio module names, types and shapes, built
    # from the official tiny checkpoint's own keys: Linear where a weight is 2-D, Embedding
    # for the embedding tables, a bare weight for the norms. PEFT injects and merges adapters
    # by module name and type.
    root = torch.nn.Module()
    for key in sd:
        *path, _ = key.split('.')
        parent = root
        for name in path[:-1]:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        if hasattr(parent, path[-1]):
            continue
        w = sd['.'.join(path) + '.weight']
        if w.ndim == 2 and any(s in key for s in ('embeddings', 'wtes', 'wpe')):
            module = torch.nn.Embedding(*w.shape)
        elif w.ndim == 2:
            module = torch.nn.Linear(w.shape[1], w.shape[0], bias='.'.join(path) + '.bias' in sd)
        else:
            module = torch.nn.Module()
            module.weight = torch.nn.Parameter(torch.empty(w.shape))
        parent.add_module(path[-1], module)
    root.load_state_dict(sd, strict=True)  # exactly the official keys and shapes
    return root


official, adapter, out = sys.argv[1:]
sd = load_file(official)
merged = peft.PeftModel.from_pretrained(official_tree(sd), adapter).merge_and_unload()
state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
assert state.keys() == sd.keys()
save_file(state, out)
"""


@pytest.mark.slow
def test_peft_adapter_loads_into_the_official_modules(tiny_model, tiny_dir, inputs, tmp_path):
  """Our PEFT adapter (every target group) loaded by `peft` into a torch model with the official
  tiny model's modules (names, types, shapes; the official modeling code itself is not
  available here) and merged by peft's merge_and_unload gives, read back by load_official, the
  logits of flmjax's unmerged LoRA forward (float32, <= 1e-5 relative)."""
  import shutil
  import subprocess
  import sys

  from flmjax.checkpoint import peft

  model = lora_model(tiny_model, ALL, noise=0.05)
  peft.write_peft(model, str(tmp_path / 'adapter'))
  out = tmp_path / 'merged'
  out.mkdir()
  (tmp_path / 'merge.py').write_text(PEFT_MERGE)
  done = subprocess.run(
    [
      sys.executable,
      'merge.py',
      str(tiny_dir / 'model.safetensors'),
      'adapter',
      str(out / 'model.safetensors'),
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  shutil.copy(tiny_dir / 'config.json', out / 'config.json')
  theirs, ours = flmjax.load_official(str(out), dtype='float32')(**inputs), model(**inputs)
  assert rel(theirs.text_logits, ours.text_logits) <= 1e-5
  assert rel(theirs.depth_logits, ours.depth_logits) <= 1e-5
  assert rel(theirs.text_logits, tiny_model(**inputs).text_logits) > 1e-2


@pytest.mark.slow
def test_int8_base_forward_within_tolerance(tiny_model, inputs):
  """Per-channel int8 weights: logits within 2% (max abs, relative to the largest logit) of the
  float32 base; the merged (dequantized) model matches the int8 forward to 1e-5."""
  lc = dataclasses.replace(ALL, base_dtype='int8')
  model = lora_model(tiny_model, lc)
  assert model.backbone.q[...].dtype == jnp.int8
  assert model.depth_transformer.qkv[...].dtype == jnp.int8
  got, want = model(**inputs), tiny_model(**inputs)
  assert rel(got.text_logits, want.text_logits) <= 2e-2
  assert rel(got.depth_logits, want.depth_logits) <= 2e-2
  assert rel(got.text_logits, want.text_logits) > 0  # it is quantized
  merged = transforms.merge(model)(**inputs)
  assert rel(merged.text_logits, got.text_logits) <= 1e-5


def test_quantize_is_symmetric_per_output_channel():
  w = jax.random.normal(jax.random.key(0), (3, 5, 2, 4)) * jnp.arange(1, 9).reshape(2, 4)
  q, scale = int8.quantize(w, 'bioo')  # [L, in, out, out]
  assert q.dtype == jnp.int8 and scale.shape == (3, 1, 2, 4)
  assert int(jnp.max(jnp.abs(q))) == 127
  np.testing.assert_allclose(q * scale, w, atol=float(jnp.max(scale)) / 2 + 1e-7)
  q0, s0 = int8.quantize(jnp.zeros((4, 3)), 'io')  # all-zero columns (layout padding) stay zero
  assert not np.any(q0) and not np.any(s0)


def test_adapter_axes_follow_the_base():
  """A and B carry their weight's logical axes (the rank replicated), so the rules shard them
  like the base: q's A over fsdp (embed), B over tensor (heads)."""
  lc = L.LoraConfig(rank=4, alpha=4.0, targets=('attn', 'depth'))
  _, state = nnx.split(abstract(ModelConfig.tiny(), lc))
  sh = nnx.to_pure_dict(shd.state_shardings(state, shd.make_mesh(2, 2, 2)))
  P = jax.sharding.PartitionSpec
  assert sh['backbone']['q_lora_a'].spec == P(None, 'fsdp', None)  # [L, D, r]
  assert sh['backbone']['q_lora_b'].spec == P(None, None, 'tensor', None)  # [L, r, N, H]
  assert sh['depth_transformer']['qkv_lora_b'].spec == P(None, None, None, 'tensor')  # [L,r,3,n]


@pytest.mark.parametrize(
  'kw, match',
  [
    (dict(rank=0, alpha=1.0), 'rank is 0'),
    (dict(rank=-2, alpha=1.0), 'rank is -2'),
    (dict(rank=4, alpha=0.0), 'alpha is 0.0'),
    (dict(rank=4, alpha=-1), 'alpha is -1'),
    (dict(rank=4, alpha=1.0, targets=('attn', 'ffn')), "unknown target 'ffn'"),
    (dict(rank=4, alpha=1.0, base_dtype='int4'), "base_dtype 'int4'"),
    (dict(rank=4, alpha=1.0, dropout=1.0), r'dropout is 1.0; it must lie in \[0, 1\)'),
    (dict(rank=4, alpha=1.0, dropout=-0.1), 'dropout is -0.1'),
  ],
)
def test_bad_lora_config(kw, match):
  with pytest.raises(ValueError, match=match):
    L.LoraConfig(**kw)


def _tc(lora, **kw):
  return TrainConfig(
    model=ModelConfig.tiny(),
    stages=(StageConfig('a', 4, random_data=True),),
    run_dir='/nonexistent',
    window=12,
    batch_size=8,
    compute_dtype='float32',
    optim=OptimConfig(eps=1e-3),
    lora=lora,
    **kw,
  )


@pytest.fixture(scope='module')
def lora_steps():
  """Two LoRA steps (int8 base, every target) on 1 device and on a (2,2,2) mesh."""
  tc = _tc(dataclasses.replace(ALL, base_dtype='int8'))
  batch = next(data_lib.make_stage_loader(tc, 0))
  out = {}
  for name, mesh in (('single', shd.make_mesh(1, 1, 1)), ('sharded', shd.make_mesh(2, 2, 2))):
    spec = st.state_spec(tc, mesh)
    state, base = st.init_state(spec, tc), st.init_base(spec, tc)
    before = jax.device_get((state.params, base))
    fn = sp.jit_train_step(spec, tc, mesh)
    losses = []
    for _ in range(2):
      state, m = fn(
        state, data_lib.to_global(batch, sp.batch_shardings(mesh)), jnp.float32(3e-3), base
      )
      losses.append(float(m['loss']))
    out[name] = (spec, before, jax.device_get((state, base)), losses)
  return out


@pytest.mark.slow
def test_only_adapters_change_in_a_step(lora_steps):
  spec, (params0, base0), (state, base), losses = lora_steps['single']
  assert set(jax.tree.leaves(jax.tree.map(lambda x: str(x.dtype), base0))) == {
    'int8',
    'float32',
    'bfloat16',
  }
  for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base)):
    assert np.array_equal(a, b)  # the base is bit-identical
  names = {k for tree in state.params.values() for k in tree}
  assert names and all(k.endswith(('_lora_a', '_lora_b')) for k in names)
  moved = [
    k
    for m in state.params
    for k in state.params[m]
    if not np.array_equal(state.params[m][k], params0[m][k])
  ]
  assert any(k.endswith('_lora_b') for k in moved)  # B leaves zero on the first step
  assert losses[1] < losses[0]
  # The optimizer holds moments of the adapters only.
  mu = state.opt_state[1].mu  # (clip, adam, decay)
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)


@pytest.mark.slow
def test_sharded_lora_step_matches_single_device(lora_steps):
  """(2,2,2) vs 1 device, float32 compute on the int8 base: the first step's loss (the forward
  alone) to 1e-5 relative; the second's, after an update whose sums ran in another order over
  the mesh, to 1e-4."""
  sharded, single = lora_steps['sharded'][3], lora_steps['single'][3]
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
  np.testing.assert_allclose(sharded[1], single[1], rtol=1e-4)
  spec = lora_steps['sharded'][0]
  assert spec.base['backbone']['q'].sharding.spec == jax.sharding.PartitionSpec(
    None, 'fsdp', 'tensor', None
  )


def test_dropout_drops_the_adapters_input_only():
  """With A = B = identity the adapter path is the dropped input itself: each entry is 0 or
  x / (1 - rate), about `rate` of them 0 (for this fixed key: no chance involved), and the
  base path sees all of x. Without adapters, dropout changes nothing."""
  rate, scale = 0.25, 2.0
  x = jax.random.normal(jax.random.key(0), (4, 64, 16)) + 3.0  # no exact zeros
  w = jax.random.normal(jax.random.key(1), (16, 16))
  p = L.wrap({'up': w, 'up_lora_a': jnp.eye(16), 'up_lora_b': jnp.eye(16)}, scale)['up']
  dropout = (jax.random.key(2), rate)
  base = jnp.einsum('BTi,io->BTo', x, w)
  delta = (W.dense('BTi,io->BTo', x, p, dropout) - base) / scale
  kept = jnp.abs(delta) > 1e-3
  np.testing.assert_allclose(np.where(kept, delta, 0), np.where(kept, x / (1 - rate), 0), rtol=1e-5)
  assert 0.2 < 1 - float(kept.mean()) < 0.3
  np.testing.assert_allclose(
    W.dense('BTi,io->BTo', x, p), base + scale * x, rtol=1e-5
  )  # no dropout: nothing dropped
  again = W.dense('BTi,io->BTo', x, p, dropout)
  assert np.array_equal(again, W.dense('BTi,io->BTo', x, p, dropout))
  assert np.array_equal(W.dense('BTi,io->BTo', x, w, dropout), base)


@pytest.mark.slow
def test_dropout_step_is_deterministic_and_differs_from_no_dropout():
  """One LoRA step with dropout 0.5, twice from the same state: bit-identical; against dropout
  0.0 the adapters move differently (B's first update sees the dropped input)."""
  mesh = shd.make_mesh(1, 1, 1)
  results = []
  for dropout in (0.5, 0.5, 0.0):
    tc = _tc(
      L.LoraConfig(
        4, 8.0, targets=('attn', 'mlp', 'depth', 'heads'), dropout=dropout, base_dtype='float32'
      )
    )
    spec = st.state_spec(tc, mesh)
    state, base = st.init_state(spec, tc), st.init_base(spec, tc)
    batch = data_lib.to_global(next(data_lib.make_stage_loader(tc, 0)), sp.batch_shardings(mesh))
    state, m = sp.jit_train_step(spec, tc, mesh)(state, batch, jnp.float32(3e-3), base)
    results.append((jax.device_get(state.params), float(m['loss'])))
  (a, loss_a), (b, loss_b), (c, loss_c) = results
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)
  assert loss_a == loss_b == loss_c  # B = 0: each step's forward is the base's
  moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c))]
  assert any(moved)


@pytest.mark.slow
def test_stream_with_a_built_decoder_runs_a_lora_model_merged_and_placed(tiny_model):
  """eval's stream(model, ..., decoder=d) loads the model into d (StreamingDecoder.load_weights):
  a LoRA model decodes merged, on one device and on a (2,1,4) mesh, as its merged weights do."""
  from flmjax.decode import SamplingConfig, StreamingDecoder
  from flmjax.eval.stream import stream

  lc = L.LoraConfig(rank=4, alpha=8.0, targets=('attn',), base_dtype='float32')
  graphdef, shapes = nnx.split(abstract(tiny_model.cfg, lc))  # no eager init: numpy adapters
  rng, adapters = np.random.default_rng(5), {}
  for path, v in nnx.to_flat_state(nnx.state(abstract(tiny_model.cfg, lc), L.LoraParam)):
    mask = L.real_mask(v.shape, v.get_metadata()['axes'], tiny_model.cfg)  # zero over padding
    adapters[path] = np.asarray(mask) * rng.normal(0, 0.5, v.shape).astype(np.float32)
  _, empty = L.split_params(nnx.to_pure_dict(shapes))
  adapters = jax.tree_util.tree_map_with_path(lambda p, _: adapters[tuple(k.key for k in p)], empty)
  model = nnx.merge(graphdef, transforms.join(nnx.to_pure_dict(nnx.state(tiny_model)), adapters))
  rng = np.random.default_rng(4)
  users = [rng.integers(0, 2048, (8, n)).astype(np.int32) for n in (14, 9)]
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  plain = StreamingDecoder(tiny_model, greedy, max_len=16)
  want, _ = stream(transforms.merge(model), users, decoder=plain)
  base, _ = stream(tiny_model, users, decoder=plain)
  assert any((a != b).any() for a, b in zip(base, want))  # the adapters change the stream
  got, _ = stream(model, users, decoder=plain)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  sharded = StreamingDecoder(tiny_model, greedy, max_len=16, mesh=shd.make_mesh(2, 1, 4))
  got, _ = stream(model, users, decoder=sharded)
  assert sharded.params['backbone']['q'][...].sharding.spec[2] == 'tensor'
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
