#!/usr/bin/env bash
# One script for a lent GPU: what flmjax has never measured on an accelerator, in at most 8 minutes,
# as one markdown table on stdout (each step's full output in $OUT/<step>.log).
#
#   bash experiments/device_check.sh                 # from the repository root, on the GPU machine
#   PYTHON=.venv/bin/python OUT=/tmp/dc bash experiments/device_check.sh
#
# Steps, each under its own time limit (seconds; 480 in all):
#   kernels    experiments/gpu_kernel_check.py: the depth kernels compiled for the GPU (Triton)
#              against the reference with the tests' tolerances, and the golden greedy stream
#              with use_pallas=True; JAX's GPU paged_attention against the XLA path
#              (float32, bfloat16, int8 pages) and the golden stream through it          (100)
#   depth      experiments/bench_depth_kernel.py: the depth frame, XLA vs Pallas, B = 1, 8, 64 (80)
#   attention  experiments/bench_attention.py: causal attention, cuDNN vs XLA (plain, chunked) (60)
#   decode     experiments/bench_decode.py --preset flm_8b --dtype bfloat16, B = 1, 8, 64  (120)
#   mimi       experiments/bench_mimi.py on the GPU, B = 1, 8                                (60)
#   roofline   experiments/roofline.py: small decode B = 1, 8, 32, Mimi, serve, train against
#              the GPU's measured bandwidth and matmul peak (rows print as they finish)     (60)
# The GPU machine has no network: when flax is missing, WHEELS=DIR (wheels carried along) is
# installed from with pip --no-index; otherwise the steps that need flax report it and go on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # steps run one after another in fresh processes

# flmjax.kernels is the kernels/ folder installed under flmjax: install the package (no network).
"$PY" -c 'import flmjax.kernels' 2>/dev/null ||
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
if ! "$PY" -c 'import flax, optax' 2>/dev/null && [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e . >>"$OUT/install.log" 2>&1 ||
    echo "device_check: installing from $WHEELS failed (see $OUT/install.log)" >&2
fi

ROWS=()
step() {  # step NAME LIMIT_S COMMAND...: runs it, keeps its log, adds a row
  local name=$1 limit=$2 rc start took status
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - start))
  case $rc in
    0) status=ok ;;
    124) status="timed out at ${limit} s" ;;
    *) status="failed (exit $rc): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-120 | tr '|' '/')" ;;
  esac
  ROWS+=("| $name | status | $status, ${took} s, log $OUT/$name.log |")
}

step kernels 100 "$PY" experiments/gpu_kernel_check.py
step depth 80 "$PY" experiments/bench_depth_kernel.py --batches 1,8,64 --no-sweep
step attention 60 "$PY" experiments/bench_attention.py --window 4096 --batch 1
step decode 120 "$PY" experiments/bench_decode.py --preset flm_8b --dtype bfloat16 \
  --batches 1,8,64 --frames 20 --max-len 1024
step mimi 60 "$PY" experiments/bench_mimi.py --batches 1,8 --frames 25 --rounds 1 --no-official
step roofline 60 "$PY" experiments/roofline.py --preset small --batches 1,8,32 --repeats 10

# One table: each step's status, then every row of the tables the steps printed, flattened to
# "column=value" pairs (a step may print several tables: each row keeps its own header's names).
DEVICE=$("$PY" -c 'import jax; print(jax.devices()[0].device_kind, "jax", jax.__version__)' 2>&1 |
  tail -1)
echo "| step | row | result |"
echo "|---|---|---|"
echo "| device | - | $DEVICE |"
printf '%s\n' "${ROWS[@]}"
for name in kernels depth attention decode mimi roofline; do
  "$PY" - "$name" "$OUT/$name.log" <<'PYEOF'
import sys
name, path = sys.argv[1:]
try:
  lines = [l.strip() for l in open(path) if l.strip().startswith('|')]
except OSError:
  lines = []
split = lambda line: [c.strip() for c in line.strip('|').split('|')]
rule = lambda cells: all(c and set(c) <= set('-: ') for c in cells)
header = None
for i, line in enumerate(lines):
  cells = split(line)
  if rule(cells):
    continue
  if i + 1 < len(lines) and rule(split(lines[i + 1])):  # a header: the next row is |---|
    header = cells
    continue
  if header is None:
    continue
  pairs = '; '.join(f'{h}={v}' for h, v in zip(header[1:], cells[1:]))
  print(f'| {name} | {header[0]}={cells[0]} | {pairs} |')
PYEOF
done
