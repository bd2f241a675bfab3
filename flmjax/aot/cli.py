"""`flmjax aot --topology v5p:4x4x4 --preset flm_8b --window 4096 --batch 64 --mesh fsdp=64`.

Compiles the train step (or, with --step decode, the decode frame) for a TPU topology with the
real TPU compiler, on any host with libtpu, and runs nothing. Prints progress, then one JSON
line: topology, chip, chips, mesh, step, window, batch, hbm_gib, args_gib, temp_gib, out_gib,
alias_gib, peak_gib (= args + out - alias + temp, per chip), fits (peak <= 0.9 x hbm),
compile_s, collectives (a count per kind). Exits 1 when the program does not fit (and, as every
flmjax command, on a bad input, with one line on stderr).
For --step decode, --window is the KV-cache slots and --batch the sessions.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

from flmjax.cli import ArgumentParser, command
from flmjax.train.config import REMAT_POLICIES

PRESETS = ('tiny', 'small', 'flm_8b')


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog='flmjax aot', description=__doc__.split('\n\n')[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--topology', required=True, help='TPU topology, e.g. v5p:4x4x4, v5e:16x16')
  p.add_argument('--config', help='a training config (experiments/configs/...): model, window, '
                 'batch, mesh, remat and dtype come from it; other flags override')
  p.add_argument('--preset', choices=PRESETS, help='model preset (default flm_8b)')
  p.add_argument('--step', choices=('train', 'decode'), default='train')
  p.add_argument('--window', type=int, help='train: frames per window (default 4096); '
                 'decode: KV-cache slots (default the model\'s max positions)')
  p.add_argument('--batch', type=int, help='global batch (default 64), or decode sessions')
  p.add_argument('--mesh', help='axis=size pairs, e.g. fsdp=16,tensor=4; data takes the rest '
                 '(default fsdp=<all chips>)')
  p.add_argument('--remat', choices=REMAT_POLICIES, help='remat policy (default full)')
  p.add_argument('--grad_accum', type=int, help='micro-batches per step (default 1)')
  return p


def _request(args, num_chips: int):
  from flmjax.aot.compile import AotRequest, parse_mesh
  from flmjax.config import ModelConfig
  from flmjax.train.config import load_config_file
  base = dict(model=None, window=None, batch=64, remat='full', grad_accum=1,
              compute_dtype='bfloat16', fsdp=None, tensor=1)
  if args.config:
    with tempfile.TemporaryDirectory() as run_dir:  # a config may prepare files in its run_dir
      tc = load_config_file(args.config, run_dir)
    base.update(model=tc.model, window=tc.window, batch=tc.batch_size, remat=tc.remat,
                grad_accum=tc.grad_accum, compute_dtype=tc.compute_dtype, fsdp=tc.mesh.fsdp,
                tensor=tc.mesh.tensor)
  if args.preset or base['model'] is None:
    base['model'] = getattr(ModelConfig, args.preset or 'flm_8b')()
  mesh = parse_mesh(args.mesh) if args.mesh else {}
  base.update({k: v for k, v in (('window', args.window), ('batch', args.batch),
                                 ('remat', args.remat), ('grad_accum', args.grad_accum))
               if v is not None}, **mesh)
  if args.mesh and 'fsdp' not in mesh:
    base['fsdp'] = 1
  if base['fsdp'] is None:
    base['fsdp'] = num_chips // base['tensor']
  if base['window'] is None:
    base['window'] = 4096 if args.step == 'train' else base['model'].max_position_embeddings
  return AotRequest(topology=args.topology, step=args.step, **base)


@command('flmjax aot')
def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  from flmjax.aot.compile import compile_report, topology_devices
  req = _request(args, len(topology_devices(args.topology)))
  record, _ = compile_report(req, lambda *a: print(*a, flush=True))
  print(json.dumps(record), flush=True)
  return 0 if record['fits'] else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
