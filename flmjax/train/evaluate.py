"""Teacher-forced evaluation on held-out data: per-stream loss and accuracy."""

from __future__ import annotations

import jax

from flmjax.train import data as data_lib
from flmjax.train.config import TrainConfig
from flmjax.train.loss import metrics_from_sums
from flmjax.train.step import batch_shardings, jit_eval_step


def evaluate(
  tc: TrainConfig,
  spec,
  mesh,
  params,
  sources,
  *,
  stage_index: int = -1,
  num_batches: int | None = None,
  seed: int = 12345,
  step=None,
) -> dict[str, float]:
  """Sums the loss over `num_batches` batches of `sources` (with the loss weights of stage
  `stage_index`), then turns the sums into metrics. A fixed seed makes it comparable across runs.
  step: a jit_eval_step(spec, tc, mesh) built before, so that many evaluations compile once."""
  num_batches = num_batches or tc.eval_batches
  stage_index = stage_index % len(tc.stages)
  loader = data_lib.make_stage_loader(tc, stage_index, seed=seed, sources=tuple(sources))
  step, bsh = step or jit_eval_step(spec, tc, mesh), batch_shardings(mesh)
  total = None
  for _ in range(num_batches):
    sums = jax.device_get(step(params, data_lib.to_global(next(loader), bsh)))
    total = sums if total is None else {k: total[k] + sums[k] for k in sums}
  out = {k: float(v) for k, v in metrics_from_sums(total).items()}
  out['targets_text'] = float(total['text_n'])
  out['targets_semantic'] = float(total['semantic_n'])
  return out


def format_metrics(m: dict[str, float]) -> str:
  rows = [
    ('text (non-WAIT) accuracy', m['acc_text']),
    ('text loss', m['loss_text']),
    ('WAIT rate: predicted', m['wait_rate_pred']),
    ('WAIT rate: targets', m['wait_rate_target']),
    ('semantic accuracy', m['acc_semantic']),
    ('semantic loss', m['loss_semantic']),
    ('acoustic accuracy', m['acc_acoustic']),
    ('acoustic loss', m['loss_acoustic']),
  ]
  return '\n'.join(f'  {k:26s} {v:8.4f}' for k, v in rows)
