"""int8 KV pages on the tiny default: exact answers and `eval duplex` metrics against the float
cache, per held-out streaming set (issue 27 §5).

Design (fixed before any arm ran):
- Model: the trained embedded default (`flmjax main --run-dir RUN`, seed 0, float32 compute),
  its latest orbax checkpoint, as `flmjax eval duplex --checkpoint RUN` loads it.
- Sets: flmjax.data.corpus.HELDOUT_DUPLEX of RUN/corpus (the four sets `flmjax main` streams),
  the first 64 conversations of each, as `flmjax main`'s report does; greedy, no penalties.
- Arms, each through flmjax.eval.duplex.evaluate_duplex with its own decoder:
  'contiguous' (today's decoder, the reference), 'paged' (kv='paged', pages in the compute
  dtype: kv_dtype='bf16' means the model's dtype, float32 here), 'paged int8' (kv_dtype='int8').
  Pages of 16 positions, a pool large enough that no session waits or slides.
- Metrics: exact answers (turn_accuracy), takeover, pause takeover, interrupt stop (rates
  pooled over a set's events, flmjax rules), and the text tokens' agreement with 'paged'.
- Interval: the difference arm - 'paged' per metric, 95% paired bootstrap over conversations
  (2000 resamples, seed 0). The claim "within 0.02" holds for a metric when |difference| <= 0.02;
  the interval says how well 64 conversations pin that down.

  python experiments/kv_int8_heldout.py --run /work/runs/default [--limit 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

METRICS = (  # name, (numerator, denominator) of one conversation's report
  ('exact answers', lambda c: (sum(t['right'] for t in c['turns']), len(c['turns']))),
  ('takeover', lambda c: _rate(c['turn_taking'], 'takeover_rate', 'turn_end')),
  ('pause takeover', lambda c: _rate(c['turn_taking'], 'pause_takeover_rate', 'pause')),
  ('interrupt stop', lambda c: _rate(c['turn_taking'], 'interrupt_stop_rate', 'interrupt')),
)
ARMS = ('contiguous', 'paged', 'paged int8')


def _rate(m: dict, key: str, kind: str) -> tuple[float, int]:
  n = m['counts'][kind]
  return ((m[key] or 0.0) * n, n)


def counts(report: dict) -> np.ndarray:
  """[conversations, metrics, 2]: each metric's numerator and denominator per conversation."""
  return np.array([[f(c) for _, f in METRICS] for c in report['conversations']], dtype=np.float64)


def pooled(x: np.ndarray) -> np.ndarray:
  """[..., conversations, metrics, 2] -> [..., metrics]: pooled rates (nan where no events)."""
  num, den = x[..., 0].sum(-2), x[..., 1].sum(-2)
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def paired_interval(a: np.ndarray, b: np.ndarray, resamples=2000, seed=0):
  """Rates of a - b and their 95% bootstrap interval over conversations (paired)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, a.shape[0], size=(resamples, a.shape[0]))
  diff = pooled(a[idx]) - pooled(b[idx])
  return pooled(a) - pooled(b), np.nanpercentile(diff, 2.5, 0), np.nanpercentile(diff, 97.5, 0)


def decoder_for(model, arm: str, max_len: int, batch: int, page_size: int):
  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig

  sampling = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  if arm == 'contiguous':
    return StreamingDecoder(model, sampling, max_len=max_len)
  pages = batch * (max_len // page_size)
  kv_dtype = 'int8' if arm == 'paged int8' else 'bf16'
  return StreamingDecoder(
    model,
    sampling,
    max_len=max_len,
    kv='paged',
    pages=pages,
    page_size=page_size,
    kv_dtype=kv_dtype,
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--run', required=True, help='run dir of `flmjax main` (checkpoints, corpus)')
  ap.add_argument('--limit', type=int, default=64)
  ap.add_argument('--page-size', type=int, default=16)
  ap.add_argument('--out', default=None, help='JSON of every number (default: RUN/kv_int8.json)')
  args = ap.parse_args()

  from flmjax.data.corpus import HELDOUT_DUPLEX
  from flmjax.data.tokenizer import find_tokenizer, load_tokenizer
  from flmjax.decode.session import load_model
  from flmjax.eval.duplex import evaluate_duplex
  from flmjax.eval.stream import read_conversations

  model = load_model(args.run)
  cfg = model.cfg
  raw = os.path.join(args.run, 'corpus', 'raw')
  tokenizer = load_tokenizer(find_tokenizer(raw, os.path.join(args.run, 'corpus')))
  convs = {
    name: read_conversations(
      os.path.join(raw, f'{name}.jsonl'), cfg.num_codebooks, limit=args.limit
    )
    for name in HELDOUT_DUPLEX
  }
  longest = max(c['user'].shape[1] for cs in convs.values() for c in cs) + cfg.max_delay + 1
  max_len = -(-longest // args.page_size) * args.page_size
  batch = max(len(cs) for cs in convs.values())
  out = {'run': os.path.abspath(args.run), 'limit': args.limit, 'max_len': max_len, 'sets': {}}
  per_arm = {}
  for arm in ARMS:
    t0 = time.time()
    dec = decoder_for(model, arm, max_len, batch, args.page_size)
    per_arm[arm] = {
      name: evaluate_duplex(model, None, tokenizer, conversations=cs, decoder=dec)
      for name, cs in convs.items()
    }
    print(f'{arm}: {time.time() - t0:.0f} s', flush=True)
  print('| held-out set | metric | contiguous | paged | paged int8 | int8 - paged [95% CI] |')
  print('|---|---|---|---|---|---|')
  for name in HELDOUT_DUPLEX:
    c = {arm: counts(per_arm[arm][name]) for arm in ARMS}
    rates = {arm: pooled(c[arm]) for arm in ARMS}
    diff, lo, hi = paired_interval(c['paged int8'], c['paged'])
    text = lambda arm, name=name: np.concatenate(
      [np.asarray(x['text_ids']) for x in per_arm[arm][name]['conversations']]
    )
    agree = {
      arm: float((text(arm) == text('paged')).mean()) for arm in ('contiguous', 'paged int8')
    }
    row = {'agreement_with_paged': agree, 'metrics': {}}
    for i, (metric, _) in enumerate(METRICS):
      den = int(c['paged'][:, i, 1].sum())
      cells = ' | '.join(f'{rates[arm][i]:.3f}' for arm in ARMS)
      print(
        f'| {name} ({den}) | {metric} | {cells} | {diff[i]:+.3f} [{lo[i]:+.3f}, {hi[i]:+.3f}] |'
      )
      row['metrics'][metric] = {
        **{arm: float(rates[arm][i]) for arm in ARMS},
        'events': den,
        'int8_minus_paged': float(diff[i]),
        'ci95': [float(lo[i]), float(hi[i])],
      }
    print(
      f'| {name} | text tokens equal to paged | {agree["contiguous"]:.4f} | 1 | '
      f'{agree["paged int8"]:.4f} | |'
    )
    out['sets'][name] = row
  path = args.out or os.path.join(args.run, 'kv_int8.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
