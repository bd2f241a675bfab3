"""The roofline instrument: each hot program's measured time against the floors its compiled
program sets on this machine (read bandwidth and matmul peak measured in the same run).

  .venv/bin/python experiments/roofline.py          # small: decode, Mimi, serve, train
  .venv/bin/python experiments/roofline.py --programs decode --batches 1,8 --max-len 4096
  .venv/bin/python experiments/roofline.py --tpu v6e:1x1   # + the 8B frame on a TPU (estimate)

For every program: FLOPs and bytes accessed from XLA's cost analysis of the compiled program;
byte floor = the bytes the program must move / read bandwidth, FLOP floor = FLOPs / matmul peak,
roofline = the larger;
measured = the median of timed calls (each waited for), the donated state threaded through.
XLA's cost analysis counts a while loop's body once (a layer scan: one layer), so the analysed
twin of each program is traced with every lax.scan unrolled; the timed program is the real one.
XLA's "bytes accessed" (shown) sums every fused op's operands and results, intermediates and
whole gathered tables included, several times what must cross memory: the byte floor uses the
bytes that must, every input read and every output written once (the compiled program's
argument + output - aliased bytes); for the decode frame flmjax.aot.roofline.frame_read_bytes
(each weight once, depth attention weights once per codebook step, embedding tables only the
rows looked up, the whole KV cache and state).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import MatmulPeak, global_batch, read_bandwidth, train_setup

from flmjax.platforms import cpu_unless_accelerator


@dataclasses.dataclass
class Program:
  """A jitted fn, its first args, which args it donates, and how outputs become the next args."""

  name: str
  batch: int
  build: Callable[[], tuple]  # () -> (jitted fn, args, donate_argnums, next_args(args, outs))
  floor_bytes: Callable | None = None  # args -> bytes that must move (default: see the module)


@contextlib.contextmanager
def unrolled_scans():
  """Every jax.lax.scan traced inside is fully unrolled (for cost analysis only)."""
  scan = jax.lax.scan
  jax.lax.scan = lambda *a, **kw: scan(*a, **{**kw, 'unroll': True})
  try:
    yield
  finally:
    jax.lax.scan = scan


def cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a jax Compiled."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c.get('flops', 0.0)), float(c.get('bytes accessed', 0.0))


def analyse(program: Program) -> tuple[float, float, float]:
  """(FLOPs, XLA's bytes accessed, bytes that must move) of the program's unrolled twin (built
  afresh, so traced anew)."""
  with unrolled_scans():
    fn, args, donate, _ = program.build()
    twin = jax.jit(getattr(fn, '__wrapped__', fn), donate_argnums=donate).lower(*args).compile()
  if program.floor_bytes is not None:
    return (*cost(twin), float(program.floor_bytes(args)))
  m = twin.memory_analysis()
  moved = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return (*cost(twin), float(moved))


def lm_frame_bytes(cfg, params, state) -> int:
  """Bytes a decode frame must read: flmjax.aot.roofline.frame_read_bytes on this device."""
  from flax import nnx

  from flmjax.aot.roofline import frame_read_bytes

  pure = nnx.to_pure_dict(params)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  batch = state['offset'].shape[0]
  return frame_read_bytes(pure, sh(pure), state, sh(state), cfg.num_codebooks, batch)


def measure(program: Program, repeats: int, warmup: int = 2) -> float:
  """Median seconds of `repeats` calls after `warmup` (the first compiles)."""
  fn, args, _, step = program.build()
  times = []
  for i in range(warmup + repeats):
    t = time.perf_counter()
    outs = jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t)
    args = step(args, outs)
  return float(np.median(times))


# ---- the programs -------------------------------------------------------------------------
def decode_programs(model, preset, batches, max_len, greedy=False):
  from flmjax.decode import SamplingConfig, StreamingDecoder

  sampling = SamplingConfig(greedy=greedy)
  C = model.cfg.num_codebooks

  def build(batch):
    dec = StreamingDecoder(model, sampling, max_len=max_len)
    user = jnp.asarray(np.random.default_rng(0).integers(0, 2048, (batch, C)), jnp.int32)
    args = (dec.params, dec.init(batch), user)
    return dec._compiled(batch)['frame'], args, (1,), lambda a, o: (a[0], o[0], a[2])

  kind = 'greedy' if greedy else 'official sampling'
  floor = lambda args: lm_frame_bytes(model.cfg, args[0], args[1])
  return [
    Program(f'decode {preset} ({kind}, S={max_len})', b, functools.partial(build, b), floor)
    for b in batches
  ]


def mimi_programs(mimi, batches):
  """Streaming encode + decode of one 80 ms frame, fused in one program (as the server runs it)."""
  from flmjax.codec import mimi as mimi_lib

  cfg = mimi.cfg

  def build(batch):
    def enc_dec(params, state, pcm):
      enc, codes = mimi_lib.encode_step(cfg, params, state['encoder'], pcm)
      dec, y = mimi_lib.decode_step(cfg, params, state['decoder'], codes)
      return {'encoder': enc, 'decoder': dec}, y

    pcm = 0.1 * np.random.default_rng(0).standard_normal((batch, mimi.frame_size))
    args = (mimi.params, mimi.init_stream(batch), jnp.asarray(pcm, jnp.float32))
    return jax.jit(enc_dec, donate_argnums=1), args, (1,), lambda a, o: (a[0], o[0], a[2])

  return [Program('Mimi stream enc+dec', b, functools.partial(build, b)) for b in batches]


def serve_programs(model, preset, mimi, batches, max_len):
  from flmjax.serve.pipeline import FramePipeline

  def build(batch):
    pipe = FramePipeline(model, mimi, batch, max_len=max_len)
    pipe.start(np.ones((batch,), bool))
    pcm = 0.1 * np.random.default_rng(0).standard_normal((batch, pipe.frame_size))
    args = (
      pipe.mimi_params,
      pipe.decoder.params,
      pipe.user_stream['encoder'],
      pipe.lm,
      pipe.model_stream['decoder'],
      jnp.asarray(pcm, jnp.float32),
    )
    return pipe._frame, args, (2, 3, 4), lambda a, o: (a[0], a[1], o[0], o[1], o[2], a[5])

  return [
    Program(f'serve frame ({preset}, S={max_len})', b, functools.partial(build, b)) for b in batches
  ]


def train_program(name, cfg, batch, window):
  from flmjax.train import step as sp

  def build():
    tc, mesh, spec, state, loader = train_setup(
      cfg, batch, window, run_dir='/tmp/roofline', compute_dtype=cfg.dtype, remat='none'
    )
    args = (state, global_batch(loader, mesh), jnp.float32(1e-4))
    fn = jax.jit(sp.train_step_fn(spec, tc, mesh), donate_argnums=(0,))
    return fn, args, (0,), lambda a, o: (o[0], a[1], a[2])

  return Program(f'train step {name} (window {window})', batch, build)


def select_programs(want, model, preset, batches, max_len, *, greedy_batches, serve_batches):
  """The programs named in `want` (decode, greedy, mimi, serve, train) at these batch sizes;
  Mimi (the full config, random weights) is made only when a program needs it."""
  from flmjax.codec import Mimi
  from flmjax.codec.mimi_config import MimiConfig
  from flmjax.config import ModelConfig

  mimi = Mimi.random(MimiConfig.full(), seed=0) if want & {'mimi', 'serve'} else None
  programs = []
  if 'greedy' in want:
    programs += decode_programs(model, preset, greedy_batches, max_len, greedy=True)
  if 'decode' in want:
    programs += decode_programs(model, preset, batches, max_len)
  if 'mimi' in want:
    programs += mimi_programs(mimi, batches)
  if 'serve' in want:
    programs += serve_programs(model, preset, mimi, serve_batches, max_len)
  if 'train' in want:
    programs += [
      train_program('tiny', ModelConfig.tiny(), 16, 64),
      train_program('small', ModelConfig.small(), 8, 256),
    ]
  return programs


# ---- the table ----------------------------------------------------------------------------
def roofline_row(name, batch, seconds, flops, xla_bytes, nbytes, bandwidth, peak) -> dict:
  byte_s, flop_s = nbytes / bandwidth, flops / peak
  roof = max(byte_s, flop_s)
  return dict(
    program=name,
    batch=batch,
    measured_ms=None if seconds is None else 1e3 * seconds,
    gflop=flops / 1e9,
    xla_mb=xla_bytes / 1e6,
    mb=nbytes / 1e6,
    byte_floor_ms=1e3 * byte_s,
    flop_floor_ms=1e3 * flop_s,
    roofline_ms=1e3 * roof,
    ratio=None if seconds is None else seconds / roof,
    of_peak=None if seconds is None else flops / seconds / peak,
  )


def machine_limits(bandwidth_bytes: int = 1 << 29, matmul_n: int = 2048):
  """() -> (read bandwidth B/s, matmul peak FLOP/s), each the best of its samples so far: call
  it before and after the programs so both ends of a shared machine's load are seen."""
  peak = MatmulPeak(matmul_n)
  bws, peaks = [], []

  def sample():
    bws.append(read_bandwidth(bandwidth_bytes, dtype=jnp.float32, best=True))
    peaks.append(peak.sample())
    return max(bws), max(peaks)

  return sample


def run(programs, repeats: int, limits, on_row=None) -> tuple[list[dict], float, float]:
  """Each program's row against limits() sampled before it (on_row(row) as each is done),
  then (every row against the limits sampled after all of them, bandwidth, peak)."""
  done = []
  for p in programs:
    measured = (p, measure(p, repeats), *analyse(p))
    done.append(measured)
    if on_row is not None:
      on_row(roofline_row(p.name, p.batch, *measured[1:], *limits()))
  bw, pk = limits()
  return [roofline_row(p.name, p.batch, s, *c, bw, pk) for p, s, *c in done], bw, pk


def tpu_estimate(topology: str, batch: int, window: int) -> dict:
  """The 8B decode frame compiled for one TPU topology, floors from the vendor's bandwidth and
  bf16 peak: an estimate (nothing runs)."""
  from flmjax.aot import compile as aot
  from flmjax.aot import roofline as rl
  from flmjax.aot.request import make_request

  req = make_request(topology, 1, step='decode', preset='flm_8b', window=window, batch=batch)
  mesh = aot.abstract_mesh_for(req, aot.topology_devices(topology))
  with unrolled_scans():
    flops, xla_bytes = cost(aot.lower_decode(req, mesh, log=lambda *_: None).compile())
  _, _, _, (params, p_sh), (state, s_sh) = aot._decode_args(req, mesh)
  nbytes = rl.frame_read_bytes(params, p_sh, state, s_sh, req.model.num_codebooks, batch)
  chip, name = req.chip, f'decode flm_8b bf16, {topology} (S={window}), ESTIMATE'
  bw, peak = rl.HBM_GBPS[chip] * 1e9, rl.PEAK_TFLOPS[chip] * 1e12
  return roofline_row(name, batch, None, flops, xla_bytes, nbytes, bw, peak)


HEADER = (
  '| program | B | measured ms | GFLOP | MB to move | XLA MB accessed | byte floor ms '
  '| FLOP floor ms | roofline ms | measured / roofline | of matmul peak |\n'
  '|---|---|---|---|---|---|---|---|---|---|---|'
)


def format_row(r) -> str:
  fmt = lambda x, f='.2f': '-' if x is None else format(x, f)
  return (
    f'| {r["program"]} | {r["batch"]} | {fmt(r["measured_ms"])} | {r["gflop"]:.3f} | '
    f'{r["mb"]:.1f} | {r["xla_mb"]:.0f} | {r["byte_floor_ms"]:.2f} | {r["flop_floor_ms"]:.2f} | '
    f'{r["roofline_ms"]:.2f} | {fmt(r["ratio"])} | {fmt(r["of_peak"], ".0%")} |'
  )


def main():
  from flmjax.config import ModelConfig
  from flmjax.model import create

  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--preset', default='small', choices=('tiny', 'small', 'flm_8b'))
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--programs', default='decode,greedy,mimi,serve,train')
  ap.add_argument('--batches', default='1,8,32', help='decode and Mimi batch sizes')
  ap.add_argument('--serve-batches', default='8,32')
  ap.add_argument('--max-len', type=int, default=1024, help='KV-cache positions per session')
  ap.add_argument('--repeats', type=int, default=10)
  ap.add_argument('--tpu', default=None, help='also estimate the 8B frame on this TPU topology')
  ap.add_argument('--tpu-batch', type=int, default=8)
  args = ap.parse_args()
  want = set(args.programs.split(','))
  batches = [int(b) for b in args.batches.split(',')]
  cfg = getattr(ModelConfig, args.preset)(dtype=args.dtype, param_dtype=args.dtype)
  model = create(cfg)
  serve = [int(b) for b in args.serve_batches.split(',')]
  programs = select_programs(
    want, model, args.preset, batches, args.max_len, greedy_batches=batches[:1], serve_batches=serve
  )
  dev = jax.devices()[0]
  print(f'# roofline: {dev.platform} {dev.device_kind}, jax {jax.__version__}, {args.dtype}')
  limits = machine_limits()
  bw, peak = limits()
  print(f'read bandwidth {bw / 1e9:.1f} GB/s, matmul peak {peak / 1e9:.0f} GFLOP/s (before)')
  print('\nAs each program finishes (against the limits so far):\n\n' + HEADER, flush=True)
  on_row = lambda r: print(format_row(r), flush=True)
  rows, bw, peak = run(programs, args.repeats, limits, on_row)
  if args.tpu:
    rows.append(tpu_estimate(args.tpu, args.tpu_batch, args.max_len))
  print(f'\nread bandwidth {bw / 1e9:.1f} GB/s, matmul peak {peak / 1e9:.0f} GFLOP/s (best in run)')
  print('\n' + HEADER)
  print('\n'.join(format_row(r) for r in rows))


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()
