"""Issue 26's before/after sitting: the roofline rows of the hot programs for one checkout of
flmjax (whichever `import flmjax` finds: run it with PYTHONPATH at another checkout for the
"before" side), then one markdown table from both sides and the official code's timings.

  python experiments/bench_26.py run --side after --out DIR [--analyse]   # rows -> DIR/after.json
  python experiments/bench_26.py table DIR                                  # the table, stdout

experiments/bench_26.sh runs the whole sitting. Programs (roofline.py's): the `small` decode
frame (S=1024) at B=1 greedy and B=1/8/32 official sampling, Mimi streaming encode+decode at
B=1/8, the `small` train step. --analyse also compiles each program's unrolled twin for its
FLOPs (roofline.analyse); the side without it takes the other side's floors (same model, same
shapes). Rows are written as each program finishes, so a step cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import roofline as rl

PROGRAMS = ('greedy1', 'decode1', 'decode8', 'decode32', 'mimi1', 'mimi8', 'train_small')


def build(name: str, model, mimi, max_len: int):
  from flmjax.config import ModelConfig

  if name.startswith('greedy'):
    return rl.decode_programs(model, 'small', [int(name[6:])], max_len, greedy=True)[0]
  if name.startswith('decode'):
    return rl.decode_programs(model, 'small', [int(name[6:])], max_len)[0]
  if name.startswith('mimi'):
    return rl.mimi_programs(mimi, [int(name[4:])])[0]
  return rl.train_program('small', ModelConfig.small(), 8, 256)


def run(args):
  import flmjax
  from flmjax.codec import Mimi
  from flmjax.codec.mimi_config import MimiConfig
  from flmjax.config import ModelConfig
  from flmjax.model import create

  names = args.programs.split(',')
  model = create(ModelConfig.small(dtype='float32', param_dtype='float32'))
  mimi = (
    Mimi.random(MimiConfig.full(), seed=0) if any(n.startswith('mimi') for n in names) else None
  )
  limits = rl.machine_limits()
  bw, peak = limits()
  out = dict(side=args.side, flmjax=os.path.dirname(flmjax.__file__), rows={}, jax=jax.__version__)
  path = os.path.join(args.out, f'{args.side}.json')
  for name in names:
    p = build(name, model, mimi, args.max_len)
    t = time.perf_counter()
    seconds = rl.measure(p, args.repeats)
    row = dict(program=p.name, batch=p.batch, seconds=seconds, wall=time.perf_counter() - t)
    if args.analyse:
      row['flops'], row['xla_bytes'], row['bytes'] = rl.analyse(p)
    bw, peak = limits()
    out.update(bandwidth=bw, peak=peak)
    out['rows'][name] = row
    with open(path, 'w') as f:
      json.dump(out, f, indent=1)
    print(f'[{args.side}] {name}: {1e3 * seconds:.2f} ms ({row["wall"]:.0f} s)', flush=True)


def official_ms(text: str, pattern: str) -> float | None:
  m = re.search(pattern, text)
  return float(m.group(1)) if m else None


def table(args):
  load = lambda side: json.load(open(os.path.join(args.dir, f'{side}.json')))
  sides = {
    s: load(s) for s in ('before', 'after') if os.path.exists(os.path.join(args.dir, f'{s}.json'))
  }
  read = lambda n: (
    open(os.path.join(args.dir, n)).read() if os.path.exists(os.path.join(args.dir, n)) else ''
  )
  lmgen = official_ms(read('official_lmgen.txt'), r'median ([\d.]+) ms')
  bw = max(s['bandwidth'] for s in sides.values())
  peak = max(s['peak'] for s in sides.values())
  print(f'Box: read bandwidth {bw / 1e9:.1f} GB/s, float32 matmul peak {peak / 1e9:.0f} GFLOP/s ')
  print('(the best samples of both sides, taken before and after each program).\n')
  for s, d in sides.items():
    print(f'- {s}: flmjax from {d["flmjax"]}, jax {d["jax"]}')
  print(
    '\n| program | B | before ms | after ms | after / before | roofline ms (bytes, FLOPs) '
    '| before / roofline | after / roofline | after, of matmul peak |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  analysed = {}
  for d in sides.values():
    analysed.update({n: r for n, r in d['rows'].items() if 'flops' in r})
  for name in PROGRAMS:
    rows = {s: d['rows'].get(name) for s, d in sides.items()}
    some = next((r for r in rows.values() if r), None)
    if some is None:
      continue
    ms = {s: None if r is None else 1e3 * r['seconds'] for s, r in rows.items()}
    a = analysed.get(name)
    roof = floors = None
    if a is not None:
      byte_ms, flop_ms = 1e3 * a['bytes'] / bw, 1e3 * a['flops'] / peak
      roof, floors = max(byte_ms, flop_ms), f'{byte_ms:.2f}, {flop_ms:.2f}'
    f = lambda x, spec='.2f': '-' if x is None else format(x, spec)
    b, af = ms.get('before'), ms.get('after')
    ratio = lambda x, roof=roof: None if x is None or roof is None else x / roof
    of_peak = None if a is None or af is None else a['flops'] / (af / 1e3) / peak
    print(
      f'| {some["program"]} | {some["batch"]} | {f(b)} | {f(af)} | '
      f'{f(None if b is None or af is None else af / b)} | {f(roof)} ({floors or "-"}) | '
      f'{f(ratio(b))} | {f(ratio(af))} | {f(of_peak, ".0%")} |'
    )
  greedy = (sides.get('after') or {}).get('rows', {}).get('greedy1')
  if lmgen is not None and greedy is not None:
    ours = 1e3 * greedy['seconds']
    print(
      f'\nOfficial `LMGen.step`, `small`, B=1, greedy (eager, same box, same sitting): '
      f'{lmgen:.2f} ms; flmjax after: {ours:.2f} ms, {lmgen / ours:.2f}x faster.'
    )
  sampled = (sides.get('after') or {}).get('rows', {}).get('decode1')
  if greedy is not None and sampled is not None:
    print(
      f'Official sampling / greedy at B=1 (after): {sampled["seconds"] / greedy["seconds"]:.2f}.'
    )
  mimi = read('official_mimi.txt')
  if mimi:
    print('\nMimi against the official torch Mimi (bench_mimi.py, alternating rounds):\n')
    print('\n'.join(line for line in mimi.splitlines() if line.startswith('|')))
  print(f'\n{read("official_lmgen.txt").strip()}')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = ap.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run')
  r.add_argument('--side', required=True, choices=('before', 'after'))
  r.add_argument('--out', required=True)
  r.add_argument('--programs', default=','.join(PROGRAMS))
  r.add_argument('--repeats', type=int, default=10)
  r.add_argument('--max-len', type=int, default=1024)
  r.add_argument('--analyse', action='store_true')
  t = sub.add_parser('table')
  t.add_argument('dir')
  args = ap.parse_args()
  run(args) if args.cmd == 'run' else table(args)


if __name__ == '__main__':
  from flmjax.platforms import cpu_unless_accelerator

  cpu_unless_accelerator()
  main()
