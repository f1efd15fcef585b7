#!/usr/bin/env bash
# Heal benchmark (issue 11) for one fixture on CPU: REAP statistics from 64K calibration tokens,
# remove 25% / 50%, heal (layer-local only, the CPU target; optionally a short distillation),
# evaluate every variant with `eval` (16,384 tokens per eval file, float32).
#   bench/heal_run.sh FIXTURE_DIR DATA_DIR OUT_DIR
# DATA_DIR holds calib/*.jsonl and eval/*.jsonl. Print the table with bench/heal_table.py.
set -euo pipefail
fix=$1; data=$2; out=$3
mkdir -p "$out"
ev() { moe-surgery eval "$1" -d "$data/eval" --dtype float32 --json > "$2"; }
moe-surgery collect "$fix" -d "$data/calib" --samples 128 --seq-len 512 --holdout 0 -o "$out/reap-stats.safetensors" --overwrite
ev "$fix" "$out/eval-unpruned.json"
for r in 0.25 0.5; do
    moe-surgery prune "$fix" --stats "$out/reap-stats.safetensors" --criterion reap --ratio $r -o "$out/reap-$r" --overwrite
    ev "$out/reap-$r" "$out/eval-reap-$r.json"
    for inputs in student teacher; do
        /usr/bin/time -v moe-surgery heal "$out/reap-$r" --teacher "$fix" -d "$data/calib" --kd-steps 0 --tokens 65536 \
            --device cpu --local-inputs $inputs -o "$out/local-$inputs-$r" --overwrite 2> "$out/local-$inputs-$r.log"
        ev "$out/local-$inputs-$r" "$out/eval-local-$inputs-$r.json"
    done
done
