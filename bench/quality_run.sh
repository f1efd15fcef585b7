#!/usr/bin/env bash
# Quality table for one fixture (issue 5): collect on all calib (256 x 512 tokens) and on code only,
# then prune with every criterion at 25% / 50% (code-only: 50%) and evaluate.
#   bench/quality_run.sh FIXTURE_DIR DATA_DIR OUT_DIR [DEVICE]
# DATA_DIR holds calib/*.jsonl and eval/*.jsonl.
set -euo pipefail
fix=$1; data=$2; out=$3; dev=${4:-cuda}
mkdir -p "$out"
cli="python3 -m surgery.cli"
$cli collect "$fix" -d "$data/calib" -o "$out/stats-all.safetensors" --samples 256 --seq-len 512 --holdout 32 \
    --dtype float32 --device "$dev" --batch-size 16 --overwrite
python3 bench/quality.py --model "$fix" --stats "$out/stats-all.safetensors" --eval "$data/eval" \
    --ratios 0.25 0.5 --device "$dev" --out "$out/quality-all.jsonl" > "$out/quality-all.md"
$cli collect "$fix" -d "$data/calib/code.jsonl" -o "$out/stats-code.safetensors" --samples 256 --seq-len 512 \
    --holdout 32 --dtype float32 --device "$dev" --batch-size 16 --overwrite
python3 bench/quality.py --model "$fix" --stats "$out/stats-code.safetensors" --eval "$data/eval" \
    --ratios 0.5 --focus code --device "$dev" --out "$out/quality-code.jsonl" > "$out/quality-code.md"
