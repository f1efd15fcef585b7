#!/usr/bin/env bash
# Issue 20 on one GPU after the heal spill and the writer's read-ahead: heal --kd-steps 0's host peak on the
# 7.5B random Qwen3-MoE, and prune --stats (25%) against cp -r with a cold page cache, three rounds.
#   OUT=/tmp/o bash bench/issue20_device.sh          # COLD=0 skips the cold-cache prune rounds
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/issue20_out}; W=${WORK:-/tmp/mg}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python bench/memory_gpu.py --workdir "$W" --steps stream,prune,heal --out "$OUT/memory_gpu-heal.json" | tee "$OUT/steps.jsonl"
rm -rf "$W/healed"
[ "${COLD:-1}" = 1 ] || exit 0  # COLD=0: the heal figures only
M=$(ls -d "$W"/model-h*)
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
for i in 1 2 3; do
  rm -rf "$W/cp" "$W/pruned"
  cold; s=$(date +%s%N); cp -r "$M" "$W/cp"; e=$(date +%s%N); echo "{\"round\": $i, \"cp_ms\": $(( (e - s) / 1000000 ))}" | tee -a "$OUT/cold.jsonl"
  rm -rf "$W/cp"
  cold; s=$(date +%s%N); python -m surgery.cli prune "$M" --stats "$W/stats-streamed.safetensors" --criterion frequency \
      --ratio 0.25 -o "$W/pruned" > /dev/null; e=$(date +%s%N)
  echo "{\"round\": $i, \"prune_ms\": $(( (e - s) / 1000000 ))}" | tee -a "$OUT/cold.jsonl"
done
du -sb "$M" "$W/pruned" | tee "$OUT/sizes.txt"
