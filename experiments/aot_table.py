"""The AOT table of experiments/RESULTS.md: `flmjax aot` rows for flm_8b on TPU topologies.

Compiles each row with the real TPU compiler on this host (libtpu, nothing runs), prints the JSON
record and how many collectives carry an unsharded (global batch, window - 1) activation.
  python experiments/aot_table.py [ROW ...]   (rows by index; default all)
"""

from __future__ import annotations

import json
import sys

from flmjax.aot.compile import collectives_carrying, compile_report
from flmjax.aot.request import AotRequest
from flmjax.config import ModelConfig

M = ModelConfig.flm_8b()
ROWS = [
  # (topology, window, batch, fsdp, tensor, remat, step)
  ('v5p:4x4x4', 512, 64, 64, 1, 'full', 'train'),
  ('v5p:4x4x4', 2048, 64, 64, 1, 'full', 'train'),
  ('v5p:4x4x4', 4096, 64, 64, 1, 'full', 'train'),
  ('v5p:4x4x4', 512, 64, 16, 4, 'full', 'train'),
  ('v5e:16x16', 512, 256, 256, 1, 'full', 'train'),
  ('v5e:16x16', 2048, 256, 256, 1, 'full', 'train'),
  ('v5e:16x16', 4096, 256, 256, 1, 'full', 'train'),
  ('v5e:2x2', 8192, 1, 1, 4, 'full', 'decode'),
  ('v5e:2x2', 8192, 8, 1, 4, 'full', 'decode'),
  ('v5e:2x2', 8192, 32, 1, 4, 'full', 'decode'),
  ('v5p:4x4x4', 4096, 64, 64, 1, 'dots', 'train'),  # is full remat needed at 4096?
  ('v5p:4x4x4', 4096, 64, 64, 1, 'none', 'train'),
]


def run(row) -> dict:
  topology, window, batch, fsdp, tensor, remat, step = row
  req = AotRequest(
    topology, M, step=step, window=window, batch=batch, fsdp=fsdp, tensor=tensor, remat=remat
  )
  record, compiled = compile_report(req, log=lambda *a: None)
  record['remat'] = remat
  if compiled is not None and step == 'train':
    hlo = compiled.as_text()
    carrying = collectives_carrying(hlo, (batch, window - 1)) + collectives_carrying(
      hlo, (batch * (window - 1),)
    )
    record['batch_carrying'] = [line[:300] for line in carrying]
  return record


if __name__ == '__main__':
  picks = [int(a) for a in sys.argv[1:]] or range(len(ROWS))
  for i in picks:
    print(json.dumps({'row': i, **run(ROWS[i])}), flush=True)
