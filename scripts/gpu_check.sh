#!/usr/bin/env bash
# One command for a CUDA machine: the GPU-marked tests, then predicted vs measured for a ~1B-parameter
# GPT (gpt3-1.3b, seq 2048, bf16) on one GPU under a few plans, printed as a table. Within 8 minutes.
#
#   scripts/gpu_check.sh            (uses .venv/bin/python when present, else python3; PYTHON=... overrides)
#
# The cluster spec is a one-node copy of dgx-h100 with the catalog device that matches this GPU (so MFU
# and the prediction use its peaks); unknown GPUs fall back to h100-sxm, said in the output.
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
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== GPU tests (pytest -m gpu) =="
timeout 240 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider || { echo "gpu_check: GPU tests failed" >&2; exit 1; }

echo "== accuracy: gpt3-1.3b on one GPU, predicted vs measured =="
CLUSTER="$WORK/one-gpu.yaml"
"$PY" - "$CLUSTER" <<'PYEOF'
import sys, torch, yaml
from hwmodel.catalog import cluster_file
name = torch.cuda.get_device_name(0)
memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
upper = name.upper()
rules = [("H200", "h200"), ("H800", "h800"), ("H100 PCIE", "h100-pcie"), ("H100", "h100-sxm"), ("B200", "b200"),
         ("A800", "a800-80g"), ("A100", "a100-80g" if memory_gib > 48 else "a100-40g"), ("L40S", "l40s"),
         ("A10", "a10"), ("4090", "rtx-4090"), ("3090", "rtx-3090"), ("TITAN RTX", "titan-rtx"), ("V100", "v100-32g"),
         ("MI300X", "mi300x"), ("MI250X", "mi250x")]
device = next((d for key, d in rules if key in upper), None)
if device is None:
    device = "h100-sxm"
    print(f"note: no catalog device for {name!r}; using h100-sxm peaks for MFU and the prediction")
data = yaml.safe_load(cluster_file("dgx-h100").read_text())
data["name"] = f"one-{device}"
data["description"] = f"one {name} ({memory_gib:.0f} GiB) as found by gpu_check.sh"
group = data["node_groups"][0]
group["count"] = 1
group["node"]["device"] = device
group["node"]["num_devices"] = 1
open(sys.argv[1], "w").write(yaml.safe_dump(data, sort_keys=False))
print(f"GPU: {name} ({memory_gib:.0f} GiB) -> catalog device {device}")
PYEOF

PLANS=(
  "micro_batch=4,global_batch=16,dtype=bf16"
  "micro_batch=4,global_batch=16,dtype=bf16,recompute=selective"
  "micro_batch=8,global_batch=16,dtype=bf16,recompute=full"
  "micro_batch=2,global_batch=16,dtype=bf16,attention=naive"
)
i=0
for plan in "${PLANS[@]}"; do
  i=$((i + 1))
  left=$(( 470 - ($(date +%s) - START) ))
  if [ "$left" -lt 40 ]; then echo "gpu_check: time budget spent; skipping the remaining plans" >&2; break; fi
  echo "plan $i: $plan"
  if ! timeout "$left" "$PY" -m executor.cli --workload gpt3-1.3b --cluster "$CLUSTER" --plan "$plan" \
      --steps 5 --warmup 2 --compare --json > "$WORK/run$i.json" 2> "$WORK/run$i.err"; then
    tail -n 3 "$WORK/run$i.err" | sed 's/^/  /'
  fi
done

"$PY" - "$WORK" "${PLANS[@]}" <<'PYEOF'
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
echo "gpu_check: done in $(( $(date +%s) - START )) s"
