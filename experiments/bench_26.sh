#!/usr/bin/env bash
# Issue 26's before/after sitting on one quiet CPU box (about 10 minutes on 2 cores, under 14 at most): the roofline
# rows of the hot programs for main at BASE (before) and for this checkout (after), the official
# LMGen.step (cofe-ai/flm-audio in its own venv) and the official Mimi (moshi), then one markdown
# table on stdout (progress on stderr). Run from the repository root:
#
#   bash experiments/bench_26.sh > /tmp/bench_26.md
#
# What it needs beside the checkout (all outside the repository; see RESULTS.md, issue 26):
#   BASE_TREE      a checkout of the "before" commit (git worktree add --detach DIR 91c5e19)
#   OFFICIAL_PY    a python with torch 2.13.0 + transformers 4.51.3 (the official code's venv)
#   OFFICIAL_SRC   cofe-ai/flm-audio extracted; OFFICIAL_BENCH the LMGen timing script
#   OFFICIAL_CKPT  `small` with random weights in the official layout (made here if missing)
#   MOSHI_SITE     a --target dir holding moshi==0.2.13 (--no-deps) for bench_mimi.py
set -uo pipefail
SCRATCH=${SCRATCH:-/work/scratch}
BASE_TREE=${BASE_TREE:-$SCRATCH/base-91c5e19}
OFFICIAL_PY=${OFFICIAL_PY:-$SCRATCH/official-venv/bin/python}
OFFICIAL_SRC=${OFFICIAL_SRC:-$SCRATCH/flm-audio}
OFFICIAL_BENCH=${OFFICIAL_BENCH:-$SCRATCH/official/bench_lmgen.py}
OFFICIAL_CKPT=${OFFICIAL_CKPT:-$SCRATCH/official/small}
MOSHI_SITE=${MOSHI_SITE:-$SCRATCH/moshi-site}
REPEATS=${REPEATS:-12}
OUT=${OUT:-$(mktemp -d /tmp/bench_26.XXXXXX)}
PY=${PY:-$PWD/.venv/bin/python}
export XLA_FLAGS= JAX_PLATFORMS=cpu

say() { echo "[bench_26 $(date -u +%T)] $*" >&2; }
step() {  # step SECONDS NAME CMD...: a step that cannot overrun the sitting
  local limit=$1 name=$2
  shift 2
  say "$name (limit ${limit}s)"
  timeout "$limit" "$@" || say "$name: exit $? (its rows so far are kept)"
}

say "results in $OUT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -f "$OFFICIAL_CKPT/config.json" ]; then
  step 120 'official checkpoint' "$PY" -c "
from flmjax.checkpoint import save_official
from flmjax.config import ModelConfig
from flmjax.model import create
save_official(create(ModelConfig.small(dtype='float32', param_dtype='float32')),
              '$OFFICIAL_CKPT', dtype='float32', overwrite=True)"
fi

# The official LMGen first (least disturbed by our programs' leftovers), then the two sides,
# decode first (the issue's main targets), then Mimi and the train step.
step 60 'official LMGen.step' "$OFFICIAL_PY" "$OFFICIAL_BENCH" "$OFFICIAL_CKPT" \
  --src "$OFFICIAL_SRC" --frames 40 > "$OUT/official_lmgen.txt"
cd experiments || exit 1
DECODE=greedy1,decode1,decode8,decode32
step 100 'before: decode' env PYTHONPATH="$BASE_TREE" "$PY" bench_26.py run --side before \
  --out "$OUT" --programs "$DECODE" --repeats "$REPEATS"
step 220 'after: decode (+ FLOP analysis)' "$PY" bench_26.py run --side after --out "$OUT" \
  --programs "$DECODE" --repeats "$REPEATS" --analyse
# Mimi and the train step: both sides timed (the train step 3 times a side); one side is analysed.
mv "$OUT/before.json" "$OUT/before_decode.json"
mv "$OUT/after.json" "$OUT/after_decode.json"
# (about 4 s a train step on the quiet box: 885 GFLOP.)
step 100 'after: Mimi (+ FLOP analysis)' "$PY" bench_26.py run --side after --out "$OUT" \
  --programs mimi1,mimi8 --repeats "$REPEATS" --analyse
mv "$OUT/after.json" "$OUT/after_mimi.json"
step 150 'after: train (+ FLOP analysis)' "$PY" bench_26.py run --side after --out "$OUT" \
  --programs train_small --repeats 3 --analyse
step 70 'before: Mimi' env PYTHONPATH="$BASE_TREE" "$PY" bench_26.py run --side before \
  --out "$OUT" --programs mimi1,mimi8 --repeats "$REPEATS"
mv "$OUT/before.json" "$OUT/before_mimi.json"
step 150 'before: train' env PYTHONPATH="$BASE_TREE" "$PY" bench_26.py run --side before \
  --out "$OUT" --programs train_small --repeats 3
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for side in ('before', 'after'):
  parts = [os.path.join(out, f'{side}{part}.json') for part in ('_decode', '_mimi', '')]
  parts = [json.load(open(p)) for p in parts if os.path.exists(p)]
  if parts:
    merged = parts[0]
    for p in parts[1:]:
      merged['rows'].update(p['rows'])
      merged['bandwidth'] = max(merged['bandwidth'], p['bandwidth'])
      merged['peak'] = max(merged['peak'], p['peak'])
    json.dump(merged, open(os.path.join(out, f'{side}.json'), 'w'))
EOF
step 120 'official Mimi (bench_mimi.py)' env PYTHONPATH="$MOSHI_SITE" "$PY" bench_mimi.py \
  --batches 1,8 --frames 15 --rounds 2 --encode-seconds 5 > "$OUT/official_mimi.txt"
say "load average $(cut -d' ' -f1-3 /proc/loadavg); table:"
"$PY" bench_26.py table "$OUT"
