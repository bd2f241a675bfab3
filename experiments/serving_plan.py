"""The 8B serving plan of experiments/RESULTS.md: the decode frame compiled per TPU topology.

For each (topology, mesh, sessions) row it runs `flmjax aot --step decode` (the real TPU compiler
on this host, nothing runs) with 8192 KV-cache positions, one compile at a time, each in its own
process, appending the JSON lines to --out (rows already there are not compiled again), then
prints the markdown table: peak GiB per chip, fits, the largest collective, the HBM-bound frame
time (an estimate: bytes a frame reads per chip / HBM bandwidth) and the sessions per chip that
stay within the 80 ms frame (the most that fit with an estimated frame <= 80 ms). Paged rows
(`--kv-pages`) read the whole pool in the estimate: the read at the pool's fill.

  nice -n 10 python experiments/serving_plan.py --out experiments/serving_plan.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MAX_LEN = 8192
FRAME_MS = 80.0
ROWS = [  # (topology, --mesh, sessions[, paged cache flags])
  *(('v5e:2x2', 'tensor=4', b) for b in (16, 64, 128)),
  *(('v5e:2x4', 'tensor=4', b) for b in (16, 64, 128)),  # data takes the other 2
  *(('v6e:2x2', 'tensor=4', b) for b in (16, 64, 128)),
  # Paged (issue 27): a pool of 2048 positions a session on average, any one up to 8192.
  ('v5e:2x2', 'tensor=4', 256, ('--kv-pages', '4096', '--page-size', '128')),
  ('v5e:2x2', 'tensor=4', 512, ('--kv-pages', '8192', '--page-size', '128', '--kv-dtype', 'int8')),
]


def key(topology, mesh, batch, paged=()):
  return ' '.join((topology, mesh, str(batch)) + tuple(paged))


def record_key(r: dict) -> str:
  return key(r['topology'], r['mesh_flag'], r['batch'], r.get('paged_flags', ()))


def kv_words(r: dict) -> str:
  if not r.get('kv_pages'):
    return 'contiguous'
  return f'paged {r["kv_pages"]} x {r["page_size"]} {r["kv_dtype"]}'


def compile_row(topology, mesh, batch, paged=()) -> dict:
  cmd = [
    sys.executable,
    '-m',
    'flmjax',
    'aot',
    '--topology',
    topology,
    '--preset',
    'flm_8b',
    '--step',
    'decode',
    '--batch',
    str(batch),
    '--max-len',
    str(MAX_LEN),
    '--mesh',
    mesh,
    *paged,
  ]
  print('$', ' '.join(cmd[1:]), flush=True)
  done = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
  if not lines:
    raise RuntimeError(f'{key(topology, mesh, batch)}: no record\n{done.stderr[-3000:]}')
  record = json.loads(lines[-1])
  record['mesh_flag'] = mesh
  record['paged_flags'] = list(paged)
  return record


def table(records: list[dict]) -> str:
  out = [
    '| topology | mesh | KV cache | sessions | peak GiB/chip | fits | largest collective MiB | '
    'read GiB/chip/frame | est. frame ms (HBM-bound) | sessions/chip within 80 ms (rows) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  best = {}
  for r in records:
    ok = r['fits'] and r['frame_ms_estimate'] <= FRAME_MS
    if ok:
      at = (r['topology'], kv_words(r))
      best[at] = max(best.get(at, 0), r['batch'] / r['chips'])
  for r in records:
    mesh = ','.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1)
    fmt = lambda v, f='{:.2f}': '-' if v is None else f.format(v)
    out.append(
      f'| {r["topology"]} | {mesh} | {kv_words(r)} | {r["batch"]} | {fmt(r["peak_gib"])} | '
      f'{"yes" if r["fits"] else "no"} | {fmt(r["largest_collective_mib"])} | '
      f'{fmt(r["read_gib_per_chip"])} | {fmt(r["frame_ms_estimate"], "{:.1f}")} | '
      f'{best.get((r["topology"], kv_words(r)), 0):g} |'
    )
  return '\n'.join(out + [''] + limits([r for r in records if not r.get('kv_pages')]))


def _reach(lo: dict, hi: dict, key: str, cap: float) -> int:
  """The batch at which the line through records lo and hi reaches `cap` in `key`."""
  per_session = (hi[key] - lo[key]) / (hi['batch'] - lo['batch'])
  return int(lo['batch'] + (cap - lo[key]) / per_session)


def limits(records: list[dict]) -> list[str]:
  """Per topology, from the lines through its smallest and largest batch (peak and bytes read
  are affine in the sessions: weights + per-session KV cache): the most sessions that fit
  (peak <= 0.9 x HBM) and the most whose HBM-bound frame stays within 80 ms."""
  out = []
  for topo in dict.fromkeys(r['topology'] for r in records):
    rows = sorted(
      (r for r in records if r['topology'] == topo and r['peak_gib'] is not None),
      key=lambda r: r['batch'],
    )
    if len(rows) < 2:
      continue
    lo, hi, chips = rows[0], rows[-1], rows[0]['chips']
    memory = _reach(lo, hi, 'peak_gib', 0.9 * lo['hbm_gib'])
    budget = FRAME_MS * 1e-3 * lo['hbm_gbps'] * 1e9 / 2**30  # GiB a chip reads in 80 ms
    bandwidth = _reach(lo, hi, 'read_gib_per_chip', budget)
    out.append(
      f'- {topo}: at most {memory} sessions fit ({memory / chips:.0f} a chip); the '
      f'HBM-bound frame stays within 80 ms up to {bandwidth} ({bandwidth / chips:.0f} a '
      f'chip), so memory, not bandwidth, limits it'
      if memory <= bandwidth
      else f'- {topo}: at most {memory} sessions fit, bandwidth limits to {bandwidth}'
    )
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', default='experiments/serving_plan.jsonl', help='JSON lines, appended')
  ap.add_argument(
    '--table-only', action='store_true', help='print the table of --out, compile nothing'
  )
  args = ap.parse_args(argv)
  records = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      records = [json.loads(line) for line in f if line.strip()]
  have = {record_key(r) for r in records}
  for row in ROWS:
    if args.table_only or key(*row) in have:
      continue
    record = compile_row(*row)
    records.append(record)
    with open(args.out, 'a') as f:
      f.write(json.dumps(record) + '\n')
  order = {key(*row): i for i, row in enumerate(ROWS)}
  records.sort(key=lambda r: order.get(record_key(r), 99))
  print(table(records))
  return 0


if __name__ == '__main__':
  sys.exit(main())
