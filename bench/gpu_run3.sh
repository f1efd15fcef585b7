#!/usr/bin/env bash
# Device run: task-specific quality on qwen3-moe-tiny (code-only calibration) and the GPU collector benchmark.
set -euo pipefail
out=$1
mkdir -p "$out/even" "$out/collect"
python3 -m surgery.cli collect gpu/fixture -d gpu/data/calib/code.jsonl -o "$out/even/stats-code.safetensors" \
    --samples 256 --seq-len 512 --holdout 32 --dtype float32 --device cuda --batch-size 16 --overwrite 2>&1 | grep -v "Collecting:"
python3 bench/quality.py --model gpu/fixture --stats "$out/even/stats-code.safetensors" --eval gpu/data/eval \
    --ratios 0.5 --focus code --device cuda --out "$out/even/quality-code.jsonl" > "$out/even/quality-code.md"
python3 bench/collect_gpu.py --data gpu/data/calib --tokenizer gpu/fixture --workdir /tmp/cb --out "$out/collect/collect_gpu.json"
