#!/usr/bin/env bash
# One command for a CUDA machine, within about 8 minutes:
#   1. the GPU-marked tests;
#   2. fused attention efficiency against sequence length (benchmarks/attention_gpu.py);
#   3. MEMO on one GPU: longest trainable sequence and MFU of tinyllama-1.1b with no recompute, full
#      recompute and MEMO, measured and predicted (benchmarks/memo_gpu.py);
#   4. predicted vs measured for gpt3-1.3b (seq 2048, bf16) under a few plans, printed as a table.
#
#   scripts/gpu_check.sh            (uses .venv/bin/python when present, else python3; PYTHON=... overrides)
#   RESULTS_DIR=DIR scripts/gpu_check.sh    also keeps the JSON of parts 2-4 in DIR
#   PARTS="1 3" scripts/gpu_check.sh        runs only those parts (device time is scarce: spend it on
#                                           what is still unmeasured); MEMO_MODES=memo narrows part 3
#
# The cluster spec is a one-node copy of dgx-h100 with the catalog device that matches this GPU and this
# machine's RAM as host memory (scripts/one_gpu_cluster.py). On a machine without a package registry, a
# folder .whl of wheels (simpy, pydantic, pulp, ...) next to this repo's root is installed to a temporary
# site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device is visible to PyTorch ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch not importable')); nothing to check here." >&2
  echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 2
fi
if [ -d .whl ] && ! "$PY" -c 'import simpy, pydantic, pulp' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hetplan-site .whl/*.whl
  export PYTHONPATH="/tmp/hetplan-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

RESULTS="${RESULTS_DIR:-$WORK}"
mkdir -p "$RESULTS"
PARTS="${PARTS:-1 2 3 4}"
want() { [[ " $PARTS " == *" $1 "* ]]; }

if want 1; then
echo "== 1. GPU tests (pytest -m gpu) =="
timeout 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log" || echo "gpu_check: GPU tests failed (see above)" >&2
fi

CLUSTER="$WORK/one-gpu.yaml"
"$PY" scripts/one_gpu_cluster.py "$CLUSTER"
cp "$CLUSTER" "$RESULTS/one-gpu.yaml"

if want 2; then
echo "== 2. fused attention efficiency against sequence length =="
timeout 90 "$PY" benchmarks/attention_gpu.py --out "$RESULTS/attention.json" || echo "gpu_check: attention sweep failed" >&2
fi

if want 3; then
echo "== 3. MEMO on one GPU: longest sequence and MFU, no recompute / full recompute / MEMO =="
timeout 360 "$PY" benchmarks/memo_gpu.py --cluster "$CLUSTER" --budget-s "${MEMO_BUDGET_S:-240}" --modes "${MEMO_MODES:-none,full,memo}" --out "$RESULTS/memo_gpu.json" \
  || echo "gpu_check: MEMO sweep failed" >&2
fi

if want 4; then
echo "== 4. accuracy: gpt3-1.3b on one GPU, predicted vs measured =="
PLANS=(
  "micro_batch=4,global_batch=16,dtype=bf16"
  "micro_batch=4,global_batch=16,dtype=bf16,recompute=selective"
  "micro_batch=8,global_batch=16,dtype=bf16,recompute=full"
  "micro_batch=2,global_batch=16,dtype=bf16,attention=naive"
)
i=0
for plan in "${PLANS[@]}"; do
  i=$((i + 1))
  left=$(( 540 - ($(date +%s) - START) ))
  if [ "$left" -lt 40 ]; then echo "gpu_check: time budget spent; skipping the remaining plans" >&2; break; fi
  echo "plan $i: $plan"
  if ! timeout "$left" "$PY" -m executor.cli --workload gpt3-1.3b --cluster "$CLUSTER" --plan "$plan" \
      --steps 5 --warmup 2 --compare --json > "$RESULTS/run$i.json" 2> "$RESULTS/run$i.err"; then
    tail -n 3 "$RESULTS/run$i.err" | sed 's/^/  /'
  fi
done

"$PY" - "$RESULTS" "${PLANS[@]}" <<'PYEOF'
import json, sys, pathlib
from rich.console import Console
from rich.table import Table
work, plans = pathlib.Path(sys.argv[1]), sys.argv[2:]
table = Table(title="gpt3-1.3b, seq 2048, one GPU: predicted vs measured (error = predicted / measured - 1)")
for col in ("plan", "iteration pred.", "measured", "error", "MFU meas.", "peak mem pred.", "measured", "error"):
    table.add_column(col, justify="left" if col == "plan" else "right")
for i, plan in enumerate(plans, start=1):
    path = work / f"run{i}.json"
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        reason = (work / f"run{i}.err").read_text().strip().splitlines()[-1:] if (work / f"run{i}.err").exists() else ["not run"]
        table.add_row(plan, "-", "-", "-", "-", "-", "-", reason[0][:60] if reason else "failed")
        continue
    data = json.loads(text)
    p, m = data["predicted"], data["measured"]
    err = lambda a, b: f"{100 * (a / b - 1):+.1f}%"
    gib = lambda v: f"{v / 2**30:.1f} GiB"
    table.add_row(plan, f"{p['iteration_time_s'] * 1e3:.0f} ms", f"{m['iteration_time_s'] * 1e3:.0f} ms",
                  err(p["iteration_time_s"], m["iteration_time_s"]), f"{100 * m['mfu']:.1f}%",
                  gib(p["peak_memory_bytes"]), gib(m["peak_memory_bytes"]), err(p["peak_memory_bytes"], m["peak_memory_bytes"]))
Console(width=160).print(table)
PYEOF
fi
echo "gpu_check: done in $(( $(date +%s) - START )) s"
