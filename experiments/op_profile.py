"""Where a hot program's time goes, op by op: a jax.profiler trace of its calls, each op's self
time (nested events removed) put under the jax operation that made it (the compiled program's
`op_name` metadata: an einsum shows as its axis letters, `aD,DV->aV/dot_general`).

  .venv/bin/python experiments/op_profile.py                         # decode small, B=8
  .venv/bin/python experiments/op_profile.py --programs decode,serve --batches 1,32 --top 20

The programs are roofline.py's (the same builders, so the same shapes). On XLA:CPU the trace
holds one event per executed op (thunk) on each worker thread; shares are of the summed op self
time on all threads, and `busy` is how much of the traced wall time each worker thread ran an
op (a frame whose threads are idle waits on its dependency chain, not on its ops). A timing: run
it on a quiet machine; the shares move less with load than the times do. issue 26's profile of
the decode frame (experiments/RESULTS.md) was made with it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import jax
from roofline import Program, select_programs

from flmjax.platforms import cpu_unless_accelerator

NOT_OPS = ('ThunkExecutor', 'SlinkyThreadPool', 'end: ')  # the executor's own spans and waits


def _instructions(hlo_text: str):
  """(computation, is root, instruction name, the rest of its line) of each instruction."""
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY )?%(\S+) .*\{$', line)
    if head:
      comp = head.group(1)
    elif comp and (m := re.match(r'^\s+(ROOT )?%(\S+) = (.*)$', line)):
      yield comp, bool(m.group(1)), m.group(2), m.group(3)


def _callees(rest: str) -> list[str]:
  """The computations an instruction runs (fused, applied, looped or branched to)."""
  found = re.findall(r'(?:calls|to_apply|body|condition)=%([\w.-]+)', rest)
  for branches in re.findall(r'branch_computations=\{([^}]*)\}', rest):
    found += re.findall(r'%([\w.-]+)', branches)
  return found


def _tables(hlo_text: str):
  """Per instruction: its metadata name, the weight it reads, the computation it fuses and the
  computation it is in; per computation: its caller and its root's (else first) name."""
  meta, weight, fused, comp_of, caller, root_name = {}, {}, {}, {}, {}, {}
  for comp, root, inst, rest in _instructions(hlo_text):
    comp_of[inst] = comp
    if op := re.search(r'op_name="([^"]*)"', rest):
      meta[inst] = re.sub(r'^jit\([^)]*\)/', '', op.group(1))
      if root or comp not in root_name:
        root_name[comp] = meta[inst]
    if w := re.search(r'%((?:params|state)__\w+)', rest):  # an argument: its pytree path
      path = re.sub(r'___value\w*$', '', w.group(1))
      weight[inst] = '(reads ' + re.sub(r'_{2,}', '/', path).strip('_/') + ')'
    if f := re.search(r'calls=%([\w.-]+)', rest):
      fused[inst] = f.group(1)
    for callee in _callees(rest):
      caller.setdefault(callee, inst)
  return meta, weight, fused, comp_of, caller, root_name


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: the jax operation that made it} from a compiled program's text. An
  instruction without metadata of its own is named by the weight or cache it reads (an
  argument's path: dots some transformation left unnamed), else by its fused computation's
  root, else by the instruction that calls the computation it is in."""
  meta, weight, fused, comp_of, caller, root_name = _tables(hlo_text)
  names = {}
  for inst in comp_of:
    at, own = inst, None
    for _ in range(20):  # up through the callers: nesting is shallow
      own = meta.get(at) or weight.get(at) or root_name.get(fused.get(at, ''))
      at = caller.get(comp_of[at])
      if own or at is None:
        break
    if own:
      names[inst] = own
  return names


def self_times(lines) -> tuple[collections.Counter, dict[str, int]]:
  """({event name: self ns}, {thread: ns running top-level events}) over trace lines, each a
  list of (start_ns, duration_ns, name); a child's time is taken out of its parent's."""
  own, busy = collections.Counter(), {}
  for thread, events in lines:
    stack, top = [], 0  # stack: [end, name, children's ns, duration]
    for start, dur, name in sorted(events, key=lambda e: (e[0], -e[1])):
      while stack and stack[-1][0] <= start:
        end, n, children, d = stack.pop()
        own[n] += d - children
      if stack:
        stack[-1][2] += dur
      elif 'wait' not in name.lower():  # an executor's span counts: its thread runs ops
        top += dur
      stack.append([start + dur, name, 0, dur])
    for _, n, children, d in stack:
      own[n] += d - children
    busy[thread] = top
  return own, busy


def table(own: collections.Counter, names: dict[str, str], calls: int) -> list[dict]:
  """Rows by jax operation, largest first: ms per call and share of all op time."""
  by_op = collections.Counter()
  for event, ns in own.items():
    if event.startswith(NOT_OPS):
      continue
    inst = event.replace('.clone', '')
    by_op[names.get(inst, '(' + re.sub(r'[.\d]+$', '', inst) + ')')] += ns
  total = sum(by_op.values()) or 1
  return [dict(op=op, ms=ns / calls / 1e6, share=ns / total) for op, ns in by_op.most_common()]


def profile(program: Program, calls: int, warmup: int = 2) -> tuple[list[dict], dict, float]:
  """(rows, {thread: busy fraction}, wall ms per call) of `calls` traced calls."""
  fn, args, _, step = program.build()
  names = op_names(fn.lower(*args).compile().as_text())
  for _ in range(warmup):
    args = step(args, jax.block_until_ready(fn(*args)))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      t = time.perf_counter()
      for _ in range(calls):
        args = step(args, jax.block_until_ready(fn(*args)))
      wall = time.perf_counter() - t
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)[0])
  lines = [
    (line.name, [(e.start_ns, e.duration_ns, e.name) for e in line.events])
    for plane in data.planes
    for line in plane.lines
    if 'XLA' in line.name  # XLA's worker threads and its client's (not Python's)
  ]
  own, busy = self_times(lines)
  busy = {t: ns / (wall * 1e9) for t, ns in busy.items() if ns}
  return table(own, names, calls), busy, wall / calls * 1e3


def main():
  from flmjax.config import ModelConfig
  from flmjax.model import create

  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--preset', default='small', choices=('tiny', 'small', 'flm_8b'))
  ap.add_argument('--programs', default='decode', help='decode,greedy,mimi,serve,train')
  ap.add_argument('--batches', default='8', help='batch sizes (decode, Mimi, serve)')
  ap.add_argument('--max-len', type=int, default=1024, help='KV-cache positions per session')
  ap.add_argument('--calls', type=int, default=20, help='calls traced per program')
  ap.add_argument('--top', type=int, default=15, help='rows printed per program')
  args = ap.parse_args()
  want, batches = set(args.programs.split(',')), [int(b) for b in args.batches.split(',')]
  model = create(getattr(ModelConfig, args.preset)())
  programs = select_programs(
    want, model, args.preset, batches, args.max_len, greedy_batches=batches, serve_batches=batches
  )
  for program in programs:
    rows, busy, wall_ms = profile(program, args.calls)
    op_ms = sum(r['ms'] for r in rows)
    threads = ', '.join(f'{b:.0%}' for b in sorted(busy.values(), reverse=True))
    print(f'\n## {program.name}, B={program.batch}: {wall_ms:.2f} ms a call traced; ')
    print(f'op time {op_ms:.2f} ms a call on all threads; threads busy {threads}\n')
    print('| jax operation | ms a call | share |\n|---|---|---|')
    for r in rows[: args.top]:
      print(f'| `{r["op"]}` | {r["ms"]:.3f} | {r["share"]:.1%} |')


if __name__ == '__main__':
  cpu_unless_accelerator()  # a CPU host with libtpu installed: no TPU probing
  main()
