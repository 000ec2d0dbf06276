#!/usr/bin/env bash
# The cost lab's committed sweep: every zoo model at 1, 4 and 8 images per request, fp32 and int8 on
# ONNX Runtime, fp32, bf16 and int8 on OpenVINO (bf16 cells fail, saying why, on a CPU without native
# bf16), on this machine's CPU; the 2018 method (1 warm-up + 10 sequential requests per cell) plus
# closed-loop levels (concurrency 1 and 4 for 5 s each) for the throughput-vs-p99 curves. Then the
# 2018 figure, accuracy vs images per dollar, the curves and the HTML report into benchmarks/results/.
#
# Run it on a quiet machine: the numbers are only as good as the machine is idle. About 35 minutes on
# 2 cores (exports and int8 calibration included). Interrupted? Run it again: finished cells are kept
# and skipped. Missing models are exported first with random weights (speed does not depend on them).
#
#   benchmarks/sweep.sh                       # priced as the c7i size matching the cores (c7i.large for 2)
#   INSTANCE=c7i.xlarge benchmarks/sweep.sh   # or name the instance type the machine stands for
#   benchmarks/sweep.sh --dry-run             # list the cells (done / todo) and stop; other flags pass to the sweep
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
REPOSITORY=${SAIKYO_REPOSITORY:-model-repository}

"$PY" -m saikyo bench sweep \
    --out "$OUT/sweep.jsonl" \
    --models all --precisions fp32,bf16,int8 --images-per-request 1,4,8 \
    --targets onnxruntime/cpu,openvino/cpu --max-batch-sizes 16 \
    --modes seed,closed --requests 10 --concurrency 1,2,4,8,16 --seconds 5 \
    --repository "$REPOSITORY" --export-missing --export-weights random \
    --log-dir "${TMPDIR:-/tmp}/saikyo-sweep-logs" \
    ${INSTANCE:+--instance-type "$INSTANCE"} "$@"
[[ " $* " == *" --dry-run "* ]] && exit 0

"$PY" -m saikyo bench plot "$OUT/sweep.jsonl" --out-dir "$OUT"
"$PY" -m saikyo bench recommend "$OUT/sweep.jsonl" --p99 500ms --qps 20 | tee "$OUT/recommend.txt"
# The report also shows the capacity searches of benchmarks/capacity.sh, when there are any.
REPORTED=("$OUT/sweep.jsonl")
[[ -f "$OUT/capacity.jsonl" ]] && REPORTED+=("$OUT/capacity.jsonl")
"$PY" -m saikyo bench report "${REPORTED[@]}" --out "$OUT/report.html" --p99 500ms --qps 20 \
    --title "saikyo cost lab: the zoo on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
