"""Teacher-forced evaluation on held-out data: per-stream loss and accuracy."""

from __future__ import annotations

from flmjax.model.loss import evaluate_batches
from flmjax.train import data as data_lib
from flmjax.train.config import TrainConfig
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
  batches = (data_lib.to_global(next(loader), bsh) for _ in range(num_batches))
  return evaluate_batches(step, params, batches)


def show(tc, result, sets: dict) -> dict:
  """Teacher-forced metrics on held-out data, trained vs untrained."""
  from flmjax.train.state import init_state

  spec, mesh = result['spec'], result['mesh']
  untrained = init_state(spec, tc).params
  table = {}
  keys = (
    ('acc_text', 'text acc (non-WAIT)'),
    ('wait_rate_pred', 'WAIT rate pred'),
    ('wait_rate_target', 'WAIT rate target'),
    ('acc_semantic', 'semantic acc'),
    ('acc_acoustic', 'acoustic acc'),
    ('loss', 'loss'),
  )
  for name, sources in sets.items():
    trained = evaluate(tc, spec, mesh, result['state'].params, sources)
    base = evaluate(tc, spec, mesh, untrained, sources)
    table[name] = {'trained': trained, 'untrained': base}
    print(f'\nheld-out {name}: teacher-forced, {int(trained["targets_text"])} text targets')
    print(f'  {"":22s} {"untrained":>10s} {"trained":>10s}')
    for k, label in keys:
      if k in ('acc_semantic', 'acc_acoustic') and not trained['targets_semantic']:
        print(f'  {label:22s} {"-":>10s} {"-":>10s}   (no speak targets)')
        continue
      print(f'  {label:22s} {base[k]:10.4f} {trained[k]:10.4f}')
  return table


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
