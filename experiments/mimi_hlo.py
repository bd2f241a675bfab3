"""What Mimi's compiled streaming frame writes besides the model's work: counts read from the
compiled program (XLA:CPU), no timing, so the same on a loaded box and a quiet one.

  python experiments/mimi_hlo.py                  # full config, random weights, B = 1 and 8
  python experiments/mimi_hlo.py --batches 1,8,32 --save /tmp/mimi_hlo   # also keep the HLO text

The program is roofline.py's "Mimi stream enc+dec": one 80 ms frame encoded and decoded in one
jit, the state donated, as the server runs it. Every top-level op of the entry computation (the
frame has no loops) is put in one class and its result bytes summed:

  data movement   fusions made only of copy / transpose / slice / concatenate / pad / reshape /
                  broadcast, and those ops alone: bytes written that the model does not need
  KV write        the ring caches' scatters (in place; their bytes are not counted)
  ELU pass        a fusion computing exp whose result is not a conv's input (ELU written out,
                  then read back by the conv input's concatenation)
  elementwise     other fusions (norms, softmax, residual adds, ELU fused into a conv's input)
  dot, conv       XNNPACK dots (ynn_fusion), XLA dots and convolutions
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from flmjax.codec import Mimi, MimiConfig
from flmjax.codec import mimi as mimi_lib

DTYPE_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'pred': 1, 'bf16': 2, 'f16': 2, 's8': 1, 'u8': 1}
MOVES = {'copy', 'transpose', 'slice', 'dynamic-slice', 'pad', 'concatenate', 'bitcast'}
MOVES |= {'reshape', 'broadcast', 'parameter', 'constant', 'tuple', 'get-tuple-element'}
SKIP = {'parameter', 'tuple', 'get-tuple-element', 'constant', 'bitcast'}


def nbytes(shape: str) -> int:
  """Bytes of an HLO shape string such as 'f32[8,2,512]{2,1,0}' (tuples summed)."""
  total = 0
  for dtype, dims in re.findall(r'\b(\w+)\[([\d,]*)\]', shape):
    total += DTYPE_BYTES.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def computations(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """HLO text -> {computation: [(name, shape, opcode, line)]}; the entry is 'ENTRY'."""
  comps, current = {}, None
  for line in text.splitlines():
    if not line.startswith(' '):
      head = re.match(r'^(ENTRY )?%([\w.\-]+) ', line)
      current = None
      if head and line.rstrip().endswith('{'):
        current = comps.setdefault('ENTRY' if head.group(1) else head.group(2), [])
      continue
    op = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(', line)
    if current is not None and op:
      current.append((op.group(1), op.group(2), op.group(3), line))
  return comps


def opcodes(comps, name: str) -> collections.Counter:
  """Opcodes inside a computation and everything it calls."""
  out = collections.Counter()
  for _, _, opcode, line in comps.get(name, []):
    out[opcode] += 1
    for callee in re.findall(r'calls=%([\w.\-]+)', line):
      out.update(opcodes(comps, callee))
  return out


def _conv_inputs(comps) -> set[str]:
  """Names of the entry ops that a dot or conv reads (seen through bitcasts)."""
  operands = {}
  for name, _, opcode, line in comps['ENTRY']:
    operands[name] = re.findall(r'%([\w.\-]+)', line.split(f' {opcode}(', 1)[1].split(')')[0])
  seen = set()
  for name, _, opcode, _ in comps['ENTRY']:
    if opcode in ('convolution', 'dot') or name.startswith('ynn'):
      todo = list(operands[name])
      while todo:
        arg = todo.pop()
        seen.add(arg)
        if arg.startswith('bitcast'):
          todo += operands.get(arg, [])
  return seen


def _kind(name: str, inner: collections.Counter, conv_inputs: set[str]) -> str:
  if inner['scatter']:
    return 'KV write (scatter, in place)'
  if inner['dot'] or inner['convolution'] or name.startswith('ynn'):
    return 'dot, conv'
  if set(inner) <= MOVES:
    return 'data movement'
  if inner['exponential'] and inner['minimum'] and name not in conv_inputs:
    return 'ELU pass'
  return 'elementwise'


def classify(text: str) -> collections.Counter:
  """{(class, 'ops' | 'bytes'): count} over the entry computation's ops. Bytes are results
  written; an in-place scatter's (the whole cache) is not counted."""
  comps = computations(text)
  conv_inputs = _conv_inputs(comps)
  out = collections.Counter()
  for name, shape, opcode, line in comps['ENTRY']:
    if opcode in SKIP:
      continue
    inner = collections.Counter({opcode: 1})
    if opcode == 'fusion':
      inner = opcodes(comps, re.search(r'calls=%([\w.\-]+)', line).group(1))
    kind = _kind(name, inner, conv_inputs)
    out[kind, 'ops'] += 1
    out[kind, 'bytes'] += 0 if kind.startswith('KV') else nbytes(shape)
  return out


def compiled_frame(mimi: Mimi, batch: int):
  """roofline.py's Mimi program, compiled for `batch` sessions."""
  cfg = mimi.cfg

  def enc_dec(params, state, pcm):
    enc, codes = mimi_lib.encode_step(cfg, params, state['encoder'], pcm)
    dec, y = mimi_lib.decode_step(cfg, params, state['decoder'], codes)
    return {'encoder': enc, 'decoder': dec}, y

  pcm = jnp.zeros((batch, mimi.frame_size), jnp.float32)
  step = jax.jit(enc_dec, donate_argnums=1)
  return step.lower(mimi.params, mimi.init_stream(batch), pcm).compile()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--batches', default='1,8')
  ap.add_argument('--save', default=None, help='a directory for the compiled HLO text')
  args = ap.parse_args()
  mimi = Mimi.random(MimiConfig.full(), seed=0)
  batches = [int(b) for b in args.batches.split(',')]
  rows = {}
  for batch in batches:
    text = compiled_frame(mimi, batch).as_text()
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      with open(os.path.join(args.save, f'mimi_stream_b{batch}.txt'), 'w') as f:
        f.write(text)
    rows[batch] = classify(text)
  kinds = ['data movement', 'ELU pass', 'KV write (scatter, in place)', 'elementwise', 'dot, conv']
  print(f'jax {jax.__version__}, {jax.default_backend()}; per 80 ms frame: ops, MB of results')
  print('| class | ' + ' | '.join(f'B={b}' for b in batches) + ' |')
  print('|---|' + '---|' * len(batches))
  for kind in kinds + ['all']:
    cells = []
    for b in batches:
      c = rows[b]
      ops = sum(v for (k, u), v in c.items() if u == 'ops' and kind in (k, 'all'))
      mb = sum(v for (k, u), v in c.items() if u == 'bytes' and kind in (k, 'all')) / 1e6
      cells.append(f'{ops} ops, {mb:.2f} MB')
    print(f'| {kind} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
