#!/usr/bin/env bash
# Issue 20 benchmark on one GPU: collect (in memory, streamed), prune, eval --reference, heal --kd-steps 0
# on a random Qwen3-MoE built on the machine. Figures go to $OUT/memory_gpu.json (and one JSON line per step).
#   bash bench/memory_gpu.sh            # the issue's 7.5B model, 64 × 2048 calibration tokens
#   SMALL=1 bash bench/memory_gpu.sh    # 4 layers first, to check the machine in a minute
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memory_gpu_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/moe-memory-gpu}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
if [[ "${SMALL:-0}" == 1 ]]; then
  python bench/memory_gpu.py --workdir "$WORK-small" --layers 4 --tokens $((16 * 2048)) --out "$OUT/memory_gpu_small.json"
else
  python bench/memory_gpu.py --workdir "$WORK" --tokens "${TOKENS:-$((64 * 2048))}" --out "$OUT/memory_gpu.json"
fi
