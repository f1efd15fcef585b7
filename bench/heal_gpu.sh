#!/usr/bin/env bash
# Heal benchmark (issue 11) on a GPU for one fixture: REAP statistics from 64K calibration tokens,
# remove 25% / 50%, then `heal` with its defaults (layer-local fit + ~8M tokens of distillation), with
# the distillation off (local only), with `--lr 1e-3` and with `--train all`; every variant evaluated with `eval`
# (16,384 tokens per eval file, float32). The heal series run side by side on the one GPU.
#   bench/heal_gpu.sh FIXTURE_DIR DATA_DIR WORK_DIR      (DATA_DIR holds calib/ and eval/)
# Writes WORK_DIR/eval-*.json, record-*.json (each heal's pruning.json record) and walls.jsonl.
set -u
fix=$1; data=$2; w=$3
mkdir -p "$w"
cli="python3 -m surgery.cli"
ev() { $cli eval "$1" -d "$data/eval" --dtype float32 --json > "$w/eval-$2.json" 2>> "$w/eval.log"; }
timed() {  # timed LABEL CMD...: appends {run, rc, seconds} to walls.jsonl
    local label=$1 start=$EPOCHREALTIME; shift
    "$@"; local rc=$?
    echo "{\"run\": \"$label\", \"rc\": $rc, \"seconds\": $(awk "BEGIN {print $EPOCHREALTIME - $start}")}" >> "$w/walls.jsonl"
    return $rc
}
heal_series() {  # heal_series NAME [heal options...]: heal both ratios, evaluate, keep the record
    local name=$1; shift
    for r in 0.25 0.5; do
        timed "$name-$r" $cli heal "$w/reap-$r" --teacher "$fix" -d "$data/calib" -o "$w/$name-$r" "$@" \
            > "$w/log-$name-$r.txt" 2>&1 || continue
        cp "$w/$name-$r/pruning.json" "$w/record-$name-$r.json"
        ev "$w/$name-$r" "$name-$r"
        rm -rf "$w/$name-$r"
    done
}
$cli collect "$fix" -d "$data/calib" --samples 128 --seq-len 512 --holdout 0 -o "$w/reap-stats.safetensors" \
    --dtype float32 --overwrite > "$w/log-collect.txt" 2>&1 || exit 1
for r in 0.25 0.5; do
    $cli prune "$fix" --stats "$w/reap-stats.safetensors" --criterion reap --ratio $r -o "$w/reap-$r" --overwrite \
        >> "$w/log-prune.txt" 2>&1 || exit 1
done
heal_series healed &
(ev "$fix" unpruned; ev "$w/reap-0.25" reap-0.25; ev "$w/reap-0.5" reap-0.5; heal_series local --kd-steps 0; heal_series all --train all) &
heal_series lr1e-3 --lr 1e-3 &
wait
