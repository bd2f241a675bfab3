"""Bytes the compiled decode frame copies: a count read from the program, not a timing.

  .venv/bin/python experiments/frame_copies.py                    # small, B=1,8,32, S=1024
  .venv/bin/python experiments/frame_copies.py --batches 8 --split both --top 12

For `StreamingDecoder`'s compiled frame (`compiled.as_text()`, XLA of this jax), "copied" sums
the result bytes of every copy, transpose, slice and dynamic-slice that materialises a buffer:
such an op standing alone, or a fusion made only of data movement (copy, transpose, slice,
dynamic-slice, bitcast, reshape, broadcast, parameters, constants), times how often its
computation runs (a while loop's known trip count; both branches of each conditional counted, so
an upper bound). Why it matters on CPU: XLA:CPU's dot (an XNNPACK custom call) reads only whole
buffers, so a slice of a stacked weight or KV cache is first copied (RESULTS.md, issue 26).
--top lists the largest copying ops (per frame) with their shapes.
"""

from __future__ import annotations

import argparse
import collections
import math
import re

import jax
import jax.numpy as jnp

from flmjax.platforms import cpu_unless_accelerator

MOVES = {'copy', 'transpose', 'slice', 'dynamic-slice'}
PLUMBING = MOVES | {'bitcast', 'reshape', 'broadcast', 'parameter', 'constant', 'tuple'}
_BYTES = {'f32': 4, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 's8': 1, 'u8': 1, 'pred': 1}
_COMP = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{\s*$')
_INST = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = (.+?) ([a-z\-]+)\((.*)$')
_SHAPE = re.compile(r'(pred|[a-z]+\d+)\[([\d,]*)\]')


def _bytes(shape_text: str) -> int:
  return sum(
    math.prod(int(d) for d in dims.split(',') if d) * _BYTES.get(dt, 4)
    for dt, dims in _SHAPE.findall(shape_text)
    if dt in _BYTES
  )


def parse(hlo: str) -> tuple[dict, str]:
  """HLO text -> ({computation: [(name, shape text, opcode, rest of line)]}, entry name)."""
  comps, entry, cur = {}, None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)  # computation headers start at column 0, instructions are indented
    if m and not line[:1].isspace():
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
      continue
    m = _INST.match(line)
    if m and cur is not None:
      comps[cur].append((m.group(2), m.group(3), m.group(4), m.group(5)))
  return comps, entry


def _callees(rest: str, opcode: str) -> list[tuple[str, int]]:
  """The computations an instruction runs, with how many times per run of it."""
  out = []
  if opcode == 'while':
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    n = int(trips.group(1)) if trips else 1
    for key in ('body', 'condition'):
      m = re.search(rf'{key}=%?([\w.\-]+)', rest)
      if m:
        out.append((m.group(1), n))
  elif opcode == 'conditional':
    m = re.search(r'branch_computations=\{([^}]*)\}', rest)
    names = m.group(1).split(',') if m else []
    for key in ('true_computation', 'false_computation'):
      t = re.search(rf'{key}=%?([\w.\-]+)', rest)
      names += [t.group(1)] if t else []
    out += [(n.strip().lstrip('%'), 1) for n in names if n.strip()]
  else:
    for key in ('to_apply', 'calls'):
      m = re.search(rf'{key}=%?([\w.\-]+)', rest)
      if m:
        out.append((m.group(1), 1))
  return out


def copies(hlo: str) -> list[tuple[int, int, str, str]]:
  """[(bytes per run, runs per frame, opcode or fusion kind, instruction name + shape)]."""
  comps, entry = parse(hlo)
  runs = _runs(comps, entry)
  out = []
  for comp in runs:
    for name, shape, opcode, rest in comps.get(comp, []):
      kind = _moving(comps, opcode, rest)
      if kind:
        out.append((_bytes(shape), runs[comp], kind, f'{name} {shape}'))
  return out


def _runs(comps: dict, entry: str) -> dict:
  """{computation: runs per run of the entry}, fusion bodies left out. HLO text defines each
  computation before its callers (no recursion), so reversed it visits callers first."""
  runs = collections.Counter({entry: 1})
  for comp in reversed(list(comps)):
    for _, _, opcode, rest in comps[comp] if runs[comp] else ():
      for callee, n in _callees(rest, opcode) if opcode != 'fusion' else ():
        runs[callee] += runs[comp] * n
  return {c: n for c, n in runs.items() if n}


def _moving(comps: dict, opcode: str, rest: str) -> str | None:
  """What an instruction copies: its opcode, a data-movement fusion's kind, or None."""
  if opcode in MOVES:
    return opcode
  body = re.search(r'calls=%?([\w.\-]+)', rest) if opcode == 'fusion' else None
  ops = {op for _, _, op, _ in comps.get(body.group(1), [])} if body else set()
  if ops and ops <= PLUMBING and ops & MOVES:
    return 'fusion(' + ','.join(sorted(ops & MOVES)) + ')'
  return None


def frame_hlo(model, batch: int, max_len: int, split: bool) -> str:
  from flmjax.decode import SamplingConfig, StreamingDecoder

  dec = StreamingDecoder(model, SamplingConfig(), max_len=max_len, split_weights=split)
  user = jnp.zeros((batch, model.cfg.num_codebooks), jnp.int32)
  state = jax.eval_shape(lambda: dec.init(batch))
  fn = dec._compiled(batch)['frame']
  return fn.lower(dec.params, state, user).compile().as_text()


def main():
  from flmjax.config import ModelConfig
  from flmjax.model import create

  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--preset', default='small', choices=('tiny', 'small'))
  ap.add_argument('--batches', default='1,8,32')
  ap.add_argument('--max-len', type=int, default=1024)
  ap.add_argument('--split', default='default', choices=('default', 'yes', 'no', 'both'))
  ap.add_argument('--top', type=int, default=0, help='list the N largest copying ops')
  args = ap.parse_args()
  cfg = getattr(ModelConfig, args.preset)(dtype='float32', param_dtype='float32')
  model = create(cfg)
  arms = {'default': [None], 'yes': [True], 'no': [False], 'both': [False, True]}[args.split]
  print(f'# frame copies: {args.preset}, S={args.max_len}, float32, jax {jax.__version__}')
  print('| frame | B | copied MB per frame | copying ops per frame |')
  print('|---|---|---|---|')
  for batch in (int(b) for b in args.batches.split(',')):
    for split in arms:
      found = copies(frame_hlo(model, batch, args.max_len, split))
      total = sum(b * n for b, n, _, _ in found)
      label = {None: 'default', True: 'split', False: 'stacked'}[split]
      print(f'| {label} | {batch} | {total / 1e6:.1f} | {sum(n for _, n, _, _ in found)} |')
      if args.top:
        agg = collections.defaultdict(lambda: [0, 0])
        for b, n, kind, what in found:
          key = (kind, re.sub(r'^[\w.\-]+ ', '', what))
          agg[key][0] += b * n
          agg[key][1] += n
        for (kind, shape), (tot, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[: args.top]:
          print(f'    {tot / 1e6:8.2f} MB  x{n:<4d} {kind} {shape[:110]}')


if __name__ == '__main__':
  cpu_unless_accelerator()
  main()
