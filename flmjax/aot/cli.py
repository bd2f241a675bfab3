"""`flmjax aot --topology v5p:4x4x4 --preset flm_8b --window 4096 --batch 64 --mesh fsdp=64`.

Compiles the train step (or, with --step decode, the decode frame) for a TPU topology with the
real TPU compiler, on any host with libtpu, and runs nothing. Prints progress, then one JSON
line: topology, chip, chips, mesh, step, window, batch, hbm_gib, args_gib, temp_gib, out_gib,
alias_gib, peak_gib (= args + out - alias + temp, per chip), fits (peak <= 0.9 x hbm),
compile_s, collectives (a count per kind), and for --step train trainable_params, trainable_gib
(float32, the whole model) and base_dtype (LoRA's frozen base, else null). Exits 1 when the
program does not fit (and, as every flmjax command, on a bad input, with one line on stderr);
then peak_gib is what the compiler's error names, and peak_is_lower_bound says whether that is
its temporaries alone.
For --step decode, --max-len is the KV-cache positions per session and --batch the sessions, and
the line also has largest_collective_mib (the largest collective in the compiled frame),
read_gib_per_chip (bytes a frame reads from HBM per chip: every weight, the whole KV cache),
hbm_gbps, frame_ms_estimate (read / HBM bandwidth: an HBM-bound estimate, not a measurement) and
pallas (--pallas: the depth transformer through the Pallas TPU kernel, in shard_map), and
kv_pages, page_size, kv_dtype (--kv-pages: a paged cache through JAX's TPU paged-attention
kernel; read_gib_per_chip then counts the whole pool: the read at the pool's fill).
"""

from __future__ import annotations

import argparse
import json
import sys

from flmjax.cli import ArgumentParser, add_set_flag, command, config_error, fail
from flmjax.train.config import REMAT_POLICIES

PRESETS = ('tiny', 'small', 'flm_8b')


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(
    prog='flmjax aot',
    description=__doc__.split('\n\n')[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--topology', required=True, help='TPU topology, e.g. v5p:4x4x4, v5e:16x16')
  p.add_argument(
    '--config',
    help='a training config (experiments/configs/... or a preset name): model, window, '
    'batch, mesh, remat and dtype come from it; --set, then the other flags override',
  )
  add_set_flag(p)
  p.add_argument('--preset', choices=PRESETS, help='model preset (default flm_8b)')
  p.add_argument('--step', choices=('train', 'decode'), default='train')
  p.add_argument('--window', type=int, help='train: frames per training window (default 4096)')
  p.add_argument(
    '--max-len',
    type=int,
    help='decode: KV-cache positions per session (default '
    "the model's max positions; --window is read as it too)",
  )
  p.add_argument('--batch', type=int, help='global batch (default 64), or decode sessions')
  p.add_argument(
    '--mesh',
    help='axis=size pairs, e.g. fsdp=16,tensor=4; data takes the rest (default fsdp=<all chips>)',
  )
  p.add_argument('--remat', choices=REMAT_POLICIES, help='remat policy (default full)')
  p.add_flag('--grad-accum', '--grad_accum', type=int, help='micro-batches per step (default 1)')
  p.add_argument(
    '--pallas',
    action='store_true',
    help='decode: the depth transformer through the '
    'Pallas TPU kernel in shard_map over the sessions (StreamingDecoder use_pallas)',
  )
  p.add_argument(
    '--lora-rank',
    type=int,
    help='train LoRA adapters of rank R (alpha R) on a frozen base instead of every parameter',
  )
  p.add_argument(
    '--lora-targets',
    help='comma-separated LoRA targets: attn, mlp, depth, heads, embed (default attn,mlp)',
  )
  p.add_argument(
    '--base-dtype',
    choices=('bfloat16', 'int8'),
    help='LoRA: the frozen base in bf16 (default) or int8 (per-channel)',
  )
  p.add_argument(
    '--kv-pages',
    type=int,
    help='decode: a paged KV cache of N pages per layer (the TPU paged-attention kernel); '
    '--max-len is then the most positions one session may reach',
  )
  p.add_argument('--page-size', type=int, help='decode, paged: positions a page (default 128)')
  p.add_argument(
    '--kv-dtype', choices=('bf16', 'int8'), help='decode, paged: the pool in bf16 or int8'
  )
  return p


# the library's argument names in its errors (flmjax.cli.spell) -> this command's flags
FLAGS = {
  'window': '--max-len',
  'mesh': '--mesh',
  'step': '--step',
  'topology': '--topology',
  **{
    name: '--' + name.replace('_', '-')
    for name in ('pallas', 'kv_pages', 'page_size', 'kv_dtype', 'lora_targets', 'base_dtype')
  },
  'lora_rank': '--lora-rank',
}


@command('flmjax aot', FLAGS)
def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  from flmjax.aot.compile import compile_report, topology_devices
  from flmjax.aot.request import make_request, parse_mesh
  from flmjax.train.config import TrainConfigError

  if args.mesh:
    parse_mesh(args.mesh)  # a typo fails before libtpu starts
  if args.overrides and not args.config:
    return fail('flmjax aot', '--set overrides a training config: give --config too')
  try:
    req = make_request(
      args.topology,
      len(topology_devices(args.topology)),
      step=args.step,
      config=args.config,
      preset=args.preset,
      window=args.max_len if args.step == 'decode' and args.max_len else args.window,
      batch=args.batch,
      mesh=args.mesh,
      remat=args.remat,
      grad_accum=args.grad_accum,
      pallas=args.pallas,
      lora_rank=args.lora_rank,
      lora_targets=args.lora_targets,
      base_dtype=args.base_dtype,
      kv_pages=args.kv_pages,
      page_size=args.page_size,
      kv_dtype=args.kv_dtype,
      overrides=args.overrides,
    )
  except TrainConfigError as e:
    return fail('flmjax aot', config_error(e, run_dir_flag=None))
  record, _ = compile_report(req, lambda *a: print(*a, flush=True))
  print(json.dumps(record), flush=True)
  return 0 if record['fits'] else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
