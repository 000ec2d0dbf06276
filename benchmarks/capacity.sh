#!/usr/bin/env bash
# The committed capacity searches: squeezenet1_1 and resnet50, fp32 and int8, at p99 <= 100 ms with one
# image per request, on this machine's CPU (ONNX Runtime, max batch 16, one local server per model, as a
# sweep cell), priced as the c7i size matching the cores. Each search brackets by doubling the Poisson
# rate, then bisects to 5% of it; every step offers >= 1000 requests (10-120 s) after 3 s of warm-up.
# Records are appended to benchmarks/results/capacity.jsonl (one per search, every step inside); then the
# recommendation at that target and the report are redrawn with the sweep's records beside them.
#
# Run it on a quiet machine: a p99 is only as good as the machine is idle. About 30 minutes on 2 cores
# (most of it resnet50 fp32, whose steps are long at a low rate); models missing from the repository are
# exported first with random weights (speed does not depend on them). Each run appends new records.
#
#   benchmarks/capacity.sh                        # the repository defaults to /tmp/saikyo-capacity-repo
#   SAIKYO_REPOSITORY=/tmp/wt17-repo INSTANCE=c7i.xlarge benchmarks/capacity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
REPOSITORY=${SAIKYO_REPOSITORY:-/tmp/saikyo-capacity-repo}
P99=${P99:-100ms}

for model in squeezenet1_1 resnet50; do
    "$PY" -m saikyo models export "$model" --weights random --if-missing --repository "$REPOSITORY"
    "$PY" -m saikyo models export "$model" --quantize int8 --if-missing --repository "$REPOSITORY"
done
for model in squeezenet1_1 squeezenet1_1-int8 resnet50 resnet50-int8; do
    # Exit status 1 when no rate met the target: that is a result too (recorded), so go on.
    "$PY" -m saikyo bench capacity --model "$model" --repository "$REPOSITORY" --p99 "$P99" \
        --out "$OUT/capacity.jsonl" --log-dir "${TMPDIR:-/tmp}/saikyo-capacity-logs" \
        ${INSTANCE:+--instance-type "$INSTANCE"} || echo "capacity of $model: no rate met p99 <= $P99 (see the record)"
done

"$PY" -m saikyo bench recommend "$OUT/sweep.jsonl" "$OUT/capacity.jsonl" --p99 "$P99" --qps 20 \
    | tee "$OUT/recommend-capacity.txt"
"$PY" -m saikyo bench report "$OUT/sweep.jsonl" "$OUT/capacity.jsonl" --out "$OUT/report.html" --p99 500ms --qps 20 \
    --title "saikyo cost lab: the zoo on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
