"""Ahead-of-time compilation for a TPU topology on any host with libtpu: nothing runs.

`jax.experimental.topologies` gives the abstract devices of a named topology (e.g. v5p:4x4x4);
the real train step (flmjax.train.step) or decode frame (flmjax.decode.frame) is lowered with
ShapeDtypeStruct arguments carrying their shardings, and the TPU compiler reports the per-chip
memory. An over-budget program fails with RESOURCE_EXHAUSTED; its required bytes are parsed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.aot import roofline
from flmjax.aot.request import AotError, AotRequest
from flmjax.platforms import tpu_chips_present

GIB = 2**30
HBM_GIB = {'v5p': 95.74, 'v6e': 32.0, 'v5e': 16.0, 'v4': 32.0}  # per chip
FIT_FRACTION = 0.9  # `fits` leaves 10% of HBM for the runtime and fragmentation
COLLECTIVES = roofline.COLLECTIVES
INSTALL_HINT = (
  'flmjax aot needs libtpu to compile for TPUs: pip install -e ".[tpu]" '
  f'(installs jax[tpu]=={jax.__version__})'
)
# libtpu looks for a TPU host when it loads; these say "compile only, no TPU here" (they silence
# its warnings). The accelerator type is a placeholder: the compile target is the topology. No
# chip is claimed, so several compiling processes may load libtpu at once (no lockfile).
_COMPILE_ONLY_ENV = {
  'TPU_SKIP_MDS_QUERY': '1',
  'TPU_WORKER_HOSTNAMES': 'localhost',
  'TPU_WORKER_ID': '0',
  'TPU_ACCELERATOR_TYPE': 'v5litepod-4',
  'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
}


def topology_devices(name: str) -> list:
  """The abstract devices of a TPU topology such as 'v5p:4x4x4'."""
  if importlib.util.find_spec('libtpu') is None:
    raise AotError(INSTALL_HINT)
  if name.split(':')[0] not in HBM_GIB:
    raise AotError(f'`topology` {name!r}: chip must be one of {sorted(HBM_GIB)}, e.g. v5p:4x4x4')
  if not tpu_chips_present():
    for k, v in _COMPILE_ONLY_ENV.items():
      os.environ.setdefault(k, v)
  from jax.experimental import topologies

  kw = {}
  dims = name.split(':')[-1].split('x')
  if all(d.isdigit() for d in dims) and 0 < len(dims) <= 3 and math.prod(map(int, dims)) < 4:
    # One host with fewer chips than libtpu's default 2x2x1 (v5e:1x1, v6e:1x1): say so.
    kw['chips_per_host_bounds'] = tuple(map(int, dims)) + (1,) * (3 - len(dims))
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name, **kw).devices)
  except Exception as e:  # libtpu raises a bare RuntimeError/XlaRuntimeError on unknown names
    raise AotError(f'`topology` {name!r}: libtpu does not know it ({e})') from e


def abstract_mesh_for(req: AotRequest, devices: list) -> jax.sharding.Mesh:
  n = len(devices)
  if n % (req.fsdp * req.tensor):
    raise AotError(
      f'`mesh` fsdp={req.fsdp},tensor={req.tensor}: {n} chips of {req.topology} '
      f'are not a multiple of fsdp*tensor = {req.fsdp * req.tensor}'
    )
  mesh = shd.make_mesh(n // (req.fsdp * req.tensor), req.fsdp, req.tensor, devices=devices)
  shd.validate_mesh(req.model, mesh.shape)
  return mesh


def _with_sharding(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def lower_train(req: AotRequest, mesh, log=print):
  """The real jitted train step (flmjax.train.step), lowered for abstract state and batch."""
  from flmjax.train.config import StageConfig, TrainConfig
  from flmjax.train.loop import check_batch_fits_mesh
  from flmjax.train.state import state_spec
  from flmjax.train.step import batch_shardings, jit_train_step

  tc = TrainConfig(
    model=req.model,
    stages=(StageConfig('aot', steps=1, random_data=True),),
    run_dir='',
    window=req.window,
    batch_size=req.batch,
    grad_accum=req.grad_accum,
    compute_dtype=req.compute_dtype,
    remat=req.remat,
    lora=req.lora,
  )
  check_batch_fits_mesh(tc, mesh)
  spec = state_spec(tc, mesh)
  for line in shd.sharding_report(
    spec.abstract.params,
    spec.shardings.params,
    spec.abstract.opt_state,
    spec.shardings.opt_state,
    spec.base,
  ):
    log(line)
  shape = (req.batch, req.model.num_channels, req.window)
  bsh = batch_shardings(mesh)
  batch = {
    'tokens': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bsh['tokens']),
    'weights': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh['weights']),
  }
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  frozen = () if spec.base is None else (spec.base,)
  lowered = jit_train_step(spec, tc, mesh).lower(spec.abstract, batch, lr, *frozen)
  trainable = jax.tree.leaves(spec.abstract.params)
  info = {
    'trainable_params': sum(x.size for x in trainable),
    'trainable_gib': round(sum(x.size * x.dtype.itemsize for x in trainable) / GIB, 3),
    'base_dtype': None if req.lora is None else req.lora.base_dtype,
  }
  return lowered, info


def _decode_args(req: AotRequest, mesh):
  """The decode frame's abstract arguments and their shardings, as StreamingDecoder places them."""
  from flax import nnx

  from flmjax.decode import state as st
  from flmjax.decode.decoder import DEPTH_LAYER_AXES
  from flmjax.decode.sampling import SamplingConfig
  from flmjax.model.flm import abstract

  cfg = req.model.replace(
    dtype=req.compute_dtype, param_dtype=req.compute_dtype, tensor_parallel=mesh.shape['tensor']
  )
  graphdef, abstract_state = nnx.split(abstract(cfg))
  params = nnx.to_pure_dict(abstract_state)
  # Under the kernel the depth layer weights are stored whole, as StreamingDecoder stores them.
  rules = shd.replicating(shd.RULES, DEPTH_LAYER_AXES) if req.pallas else shd.RULES
  p_sh = nnx.to_pure_dict(shd.state_shardings(abstract_state, mesh, rules))
  sampling = SamplingConfig()
  kv = paged_kv(req)
  seeds = jnp.zeros((req.batch,), jnp.uint32)
  state = jax.eval_shape(lambda: st.init(cfg, sampling, req.batch, req.window, seeds, kv=kv))
  return cfg, graphdef, sampling, (params, p_sh), (state, st.shardings(state, mesh))


def paged_kv(req: AotRequest):
  """The request's paged cache (None: contiguous), read through the TPU paged-attention kernel."""
  if not req.kv_pages:
    return None
  from flmjax.decode.pages import PagedKV

  # int8 pages go through the XLA path: the kernel's int8 format broadcasts the per-token
  # scales to the head dim in HBM ([K, pages, P, H] float32, 4x the int8 pool), which measured
  # 39.26 GiB of temporaries for 8192 pages of the 8B on v5e (docs/decoding.md).
  impl = 'kernel' if req.kv_dtype == 'bf16' else 'xla'
  return PagedKV(req.kv_pages, req.page_size, req.window // req.page_size, req.kv_dtype, impl)


def lower_decode(req: AotRequest, mesh, log=print):
  """The decoder's frame (flmjax.decode.frame) for `batch` sessions of `window` cache positions,
  traced with the mesh in context as the decoder traces it."""
  from flax import nnx

  from flmjax.decode.frame import frame

  cfg, graphdef, sampling, (params, p_sh), (state, s_sh) = _decode_args(req, mesh)
  rows = shd.named_sharding(('batch', None), (req.batch, 1), mesh)
  log(
    f'decode frame: {req.batch} sessions, {req.window} cache positions, {req.compute_dtype}'
    + (', Pallas depth kernel' if req.pallas else '')
    + (
      f', paged: {req.kv_pages} pages of {req.page_size} ({req.kv_dtype}), TPU kernel'
      if req.kv_pages
      else ''
    )
  )
  layers_fn = None
  if req.pallas:
    from flmjax.kernels.depth_step import select_depth_layers_fn

    layers_fn = select_depth_layers_fn(backend='tpu')  # traced here on a CPU host

  def run_frame(params, state, user):
    return frame(
      nnx.merge(graphdef, params),
      state,
      user,
      penalized=sampling.penalized_codebooks,
      layers_fn=layers_fn,
      kv=kv,
      span=1 if kv is None else kv.max_pages,
    )

  kv = paged_kv(req)
  step = jax.jit(
    shd.traced_on(mesh, run_frame),
    in_shardings=(p_sh, s_sh, rows),
    out_shardings=(s_sh, rows, shd.named_sharding(('batch',), (req.batch,), mesh)),
    donate_argnums=1,
  )
  user = jax.ShapeDtypeStruct((req.batch, cfg.num_codebooks), jnp.int32, sharding=rows)
  return step.lower(_with_sharding(params, p_sh), _with_sharding(state, s_sh), user)


def decode_plan(req: AotRequest, mesh, hlo: str | None) -> dict:
  """The decode record's extra keys: largest collective (MiB), bytes read per frame per chip
  (GiB), the chip's HBM bandwidth and the HBM-bound frame time (ms, an estimate)."""
  cfg, _, _, (params, p_sh), (state, s_sh) = _decode_args(req, mesh)
  read = roofline.frame_read_bytes(params, p_sh, state, s_sh, cfg.num_codebooks, req.batch)
  return {
    'largest_collective_mib': None if hlo is None else roofline.largest_collective_mib(hlo),
    'read_gib_per_chip': round(read / GIB, 3),
    'hbm_gbps': roofline.HBM_GBPS[req.chip],
    'frame_ms_estimate': roofline.frame_ms_estimate(read, req.chip),
    'pallas': req.pallas,
    'kv_pages': req.kv_pages,
    'page_size': req.page_size if req.kv_pages else None,
    'kv_dtype': req.kv_dtype,
  }


def collective_counts(hlo: str) -> dict[str, int]:
  """Collectives per kind in compiled HLO text (an async start/done pair counts once)."""
  counts = {}
  for kind in COLLECTIVES:
    counts[kind] = len(re.findall(rf'\s{kind}(?:-start)?\(', hlo))
  return counts


def collectives_carrying(hlo: str, dims: tuple[int, ...]) -> list[str]:
  """The collective instructions of compiled HLO whose operand or result shape contains `dims`
  as consecutive dimensions (e.g. (global batch, window - 1): an unsharded activation)."""
  want = ','.join(map(str, dims))
  hits = []
  for line in hlo.splitlines():
    if not any(re.search(rf'\s{k}(?:-start)?\(', line) for k in COLLECTIVES):
      continue
    for shape in re.findall(r'\[([\d,]+)\]', line):
      if f',{shape},'.find(f',{want},') >= 0:
        hits.append(line.strip())
        break
  return hits


def required_bytes(message: str) -> int | None:
  """Bytes a RESOURCE_EXHAUSTED compile error says the program needs (None if unparsed): its
  'Used X of Y hbm' total, or the size it says exceeds HBM. The compiler may stop at the
  temporaries ('... required for HLO temporaries (33.36G) exceeds ...'): then a lower bound."""
  units = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  m = re.search(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm', message)
  if m:
    return int(float(m.group(1)) * units[m.group(2)])
  m = re.search(r'([\d.]+)([KMGT])i?B?\)? .{0,40}exceeds', message)
  return int(float(m.group(1)) * units[m.group(2)]) if m else None


def compile_report(req: AotRequest, log=print):
  """Compiles `req`: (the JSON record, see flmjax.aot.cli for its keys; the jax Compiled, or
  None when the program does not fit)."""
  if req.step not in ('train', 'decode'):
    raise AotError(f'`step` {req.step!r}: use train or decode')
  devices = topology_devices(req.topology)
  mesh = abstract_mesh_for(req, devices)
  hbm = HBM_GIB[req.chip]
  record = {
    'topology': req.topology,
    'chip': devices[0].device_kind,
    'chips': len(devices),
    'mesh': dict(mesh.shape),
    'step': req.step,
    'window': req.window,
    'batch': req.batch,
    'hbm_gib': hbm,
  }
  log(
    f'lowering the {req.step} step of {req.topology} ({len(devices)} chips), mesh '
    f'{dict(mesh.shape)}, window {req.window}, batch {req.batch}, remat {req.remat}'
  )
  info = {}  # train: what is trained, the record's last keys
  if req.step == 'train':
    lowered, info = lower_train(req, mesh, log)
  else:
    lowered = lower_decode(req, mesh, log)
  log('compiling with the TPU compiler...')
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax raises XlaRuntimeError (a RuntimeError subclass)
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    need = required_bytes(str(e))
    log(f'RESOURCE_EXHAUSTED: {str(e).splitlines()[0][:300]}')
    record.update(
      args_gib=None,
      temp_gib=None,
      out_gib=None,
      alias_gib=None,
      peak_gib=None if need is None else round(need / GIB, 2),
      fits=False,
      peak_is_lower_bound='temporaries' in str(e),
      compile_s=round(time.perf_counter() - t0, 1),
      collectives=None,
      **info,
    )
    if req.step == 'decode':
      record.update(decode_plan(req, mesh, None))
    return record, None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = args + out - alias + temp
  hlo = compiled.as_text()  # megabytes for the 8B: built once
  record.update(
    args_gib=round(args / GIB, 3),
    temp_gib=round(temp / GIB, 3),
    out_gib=round(out / GIB, 3),
    alias_gib=round(alias / GIB, 3),
    peak_gib=round(peak / GIB, 3),
    fits=peak / GIB <= FIT_FRACTION * hbm,
    compile_s=round(compile_s, 1),
    collectives=collective_counts(hlo),
    **info,
  )
  if req.step == 'decode':
    record.update(decode_plan(req, mesh, hlo))
    for kind, size, line in sorted(roofline.collective_sizes(hlo), key=lambda c: -c[1])[:3]:
      log(f'collective {kind} {size / 2**20:.2f} MiB: {line[:160]}')
  return record, compiled
