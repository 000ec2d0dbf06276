#!/usr/bin/env bash
# `--workers` on a machine with many cores, CPU only: servers with 1, 2, 4 and 8 workers side by side
# (load rounds alternating) and the raw multi-process ceiling, for squeezenet1_1-int8 and resnet50-int8
# at 8 images per request; a few minutes. Missing models are exported first (random weights: speed does
# not depend on them; calibrated on the bundled cat photo, so that no download is needed).
#
#   benchmarks/workers.sh                 # repository /tmp/saikyo-workers-repo
#   benchmarks/workers.sh REPOSITORY      # or your own; PY=python3.12 to pick the interpreter
#
# Each model's last line: ratio=<best N-workers img/s / 1-worker img/s> workers=N ... of_raw=<server /
# raw N-process img/s>. Targets: ratio >= 4 and of_raw >= 0.8 (16 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPOSITORY=${1:-/tmp/saikyo-workers-repo}

for model in squeezenet1_1 resnet50; do
    "$PY" -m saikyo models export "$model" --weights random --quantize int8 --if-missing \
        --calibration-image tests/data/cat.jpg --repository "$REPOSITORY"
done
for model in squeezenet1_1-int8 resnet50-int8; do
    "$PY" benchmarks/workers.py --repository "$REPOSITORY" --model "$model" --images-per-request 8 \
        --concurrency 32 --workers 2,4,8 --raw --rounds 2 --seconds 10 --warmup 3
done
