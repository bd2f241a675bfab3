"""What a compiled train step writes besides its matmuls: the bytes each kind of op materialises
per step, read from the compiled program's text (deterministic; no timing).

  .venv/bin/python experiments/hlo_traffic.py --preset small [--scan-layers] [--top 20]
  .venv/bin/python experiments/hlo_traffic.py --hlo step.txt     # a saved compiled.as_text()

Each top-level op of the entry computation, of while bodies (times the loop's known trip count)
and of both branches of each conditional (an upper bound) is put in a kind: `dot` (XLA:CPU's
XNNPACK fusions and plain dots), or a fusion named by its root op under any bitcasts (`copy` and
`transpose` are relayouts, `dynamic-update-slice` counts the update's bytes, as it is written in
place), or the op itself. Bytes are the op's result. Fused elementwise work (`multiply`, `add`,
...) is the model's own; copies, transposes, broadcasts of zeros, slices, pads and the
dynamic-slice/update-slice pairs of a layer scan's saved activations are what issue 26 looked for
(experiments/RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import math
import re

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 'f64': 8, 's64': 8, 'u64': 8}
SKIP = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast')


def nbytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's parts added)."""
  parts = re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape)
  return sum(
    DTYPE_BYTES.get(d, 4) * math.prod(int(s) for s in dims.split(',') if s) for d, dims in parts
  )


def parse(text: str) -> tuple[dict, str]:
  """{computation: [ops]} and the entry's name; an op is a dict of name, shape, op, rest, root."""
  comps, cur, entry = {}, None, None
  for line in text.splitlines():
    head = re.match(r'^(ENTRY )?%(\S+) .*\{$', line)
    if head:
      cur, comps[head.group(2)] = head.group(2), []
      entry = cur if head.group(1) else entry
    elif line.startswith('}'):
      cur = None
    elif cur and (m := re.match(r'^\s+(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$', line)):
      root, name, shape, op, rest = m.groups()
      comps[cur].append(dict(root=bool(root), name=name, shape=shape, op=op, rest=rest))
  return comps, entry


def _operands(rest: str) -> list[str]:
  return re.findall(r'%([\w.-]+)', rest.split('),')[0])


def _kind(comps: dict, op: dict) -> tuple[str, dict, dict]:
  """(kind, the op that names it, its computation's ops by name)."""
  if op['op'] != 'fusion':
    return op['op'], op, {}
  if '"kind":"__ynn_fusion"' in op['rest']:
    return 'dot', op, {}
  body = {o['name']: o for o in comps[re.search(r'calls=%([\w.-]+)', op['rest']).group(1)]}
  root = next(o for o in body.values() if o['root'])
  while root['op'] in ('bitcast', 'reshape') and _operands(root['rest'])[0] in body:
    root = body[_operands(root['rest'])[0]]
  return 'fusion ' + root['op'], root, body


def traffic(text: str) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
  """(bytes by kind, ops by kind, bytes by (kind, op name, shape, loop path)) per execution."""
  comps, entry = parse(text)
  shapes = {o['name']: o['shape'] for ops in comps.values() for o in ops}
  by_kind, count, items = collections.Counter(), collections.Counter(), collections.Counter()

  def walk(comp: str, times: int, where: str):
    for op in comps[comp]:
      rest = op['rest']
      if op['op'] == 'while':
        n = int(re.search(r'"known_trip_count":\{"n":"(\d+)"', rest).group(1))
        body = re.search(r'body=%([\w.-]+)', rest).group(1)
        walk(body, times * n, f'{where}/{op["name"]} x{n}')
      elif op['op'] == 'conditional':
        for branch in re.findall(
          r'%([\w.-]+)', re.search(r'branch_computations=\{([^}]*)\}', rest)[1]
        ):
          walk(branch, times, f'{where}/cond')
      elif op['op'] == 'call':
        walk(re.search(r'to_apply=%([\w.-]+)', rest).group(1), times, where)
      elif op['op'] not in SKIP:
        kind, named, body = _kind(comps, op)
        size = nbytes(op['shape'])
        if kind.endswith('dynamic-update-slice'):  # written in place: the update's bytes
          update = _operands(named['rest'])[1]
          size = nbytes(body[update]['shape'] if update in body else shapes.get(update, ''))
        by_kind[kind] += size * times
        count[kind] += times
        items[(kind, op['name'], op['shape'].split('{')[0], where)] += size * times

  walk(entry, 1, '')
  return by_kind, count, items


def compiled_step_text(preset: str, scan_layers: bool) -> str:
  import jax.numpy as jnp
  from bench_common import global_batch, train_setup

  from flmjax.config import ModelConfig
  from flmjax.model import params
  from flmjax.train import step as sp

  params.SCAN_LAYERS = True if scan_layers else None
  cfg, batch, window = {
    'tiny': (ModelConfig.tiny(), 16, 64),
    'small': (ModelConfig.small(), 8, 256),
  }[preset]
  tc, mesh, spec, state, loader = train_setup(cfg, batch, window, compute_dtype='float32')
  step = sp.jit_train_step(spec, tc, mesh)
  return step.lower(state, global_batch(loader, mesh), jnp.float32(1e-4)).compile().as_text()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--preset', default='small', help='tiny | small (bench_train.py shapes, float32)')
  ap.add_argument('--scan-layers', action='store_true', help='the layer scan even on CPU')
  ap.add_argument('--hlo', default=None, help="a saved compiled program's text instead")
  ap.add_argument('--top', type=int, default=15, help='largest single ops to list')
  args = ap.parse_args()
  text = open(args.hlo).read() if args.hlo else compiled_step_text(args.preset, args.scan_layers)
  by_kind, count, items = traffic(text)
  for kind, b in by_kind.most_common():
    print(f'{kind:34s} {b / 1e6:10.1f} MB {count[kind]:6d} ops')
  print(f'{"all materialised":34s} {sum(by_kind.values()) / 1e6:10.1f} MB')
  for (kind, name, shape, where), b in items.most_common(args.top):
    print(f'{b / 1e6:9.1f} MB  {kind:30s} {name:40s} {shape:28s} {where}')


if __name__ == '__main__':
  main()
