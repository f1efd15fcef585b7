#!/usr/bin/env bash
# Heal option sweep (issue 11) on a GPU for one fixture: REAP statistics from 64K calibration tokens, remove
# 25% / 50%, evaluate unpruned and removal, then one `heal` per variant and ratio, all side by side on the one GPU,
# each evaluated with `eval` (16,384 tokens per eval file, float32).
#   bench/heal_sweep.sh FIXTURE_DIR DATA_DIR WORK_DIR NAME="heal options" ...   (DATA_DIR holds calib/ and eval/)
# Writes WORK_DIR/eval-*.json, record-*.json (each heal's pruning.json record) and walls.jsonl.
set -u
fix=$1; data=$2; w=$3; shift 3
mkdir -p "$w"
cli="python3 -m surgery.cli"
ev() { $cli eval "$1" -d "$data/eval" --dtype float32 --json > "$w/eval-$2.json" 2>> "$w/eval.log"; }
heal_one() {  # heal_one NAME RATIO [heal options...]: heal, time, evaluate, keep the record
    local name=$1 r=$2 start=$EPOCHREALTIME rc; shift 2
    $cli heal "$w/reap-$r" --teacher "$fix" -d "$data/calib" -o "$w/$name-$r" "$@" > "$w/log-$name-$r.txt" 2>&1
    rc=$?
    echo "{\"run\": \"$name-$r\", \"rc\": $rc, \"seconds\": $(awk "BEGIN {print $EPOCHREALTIME - $start}")}" >> "$w/walls.jsonl"
    [ $rc = 0 ] || return
    cp "$w/$name-$r/pruning.json" "$w/record-$name-$r.json"
    ev "$w/$name-$r" "$name-$r"
    rm -rf "$w/$name-$r"
}
$cli collect "$fix" -d "$data/calib" --samples 128 --seq-len 512 --holdout 0 -o "$w/reap-stats.safetensors" \
    --dtype float32 --overwrite > "$w/log-collect.txt" 2>&1 || exit 1
for r in 0.25 0.5; do
    $cli prune "$fix" --stats "$w/reap-stats.safetensors" --criterion reap --ratio $r -o "$w/reap-$r" --overwrite \
        >> "$w/log-prune.txt" 2>&1 || exit 1
done
for v in "$@"; do
    name=${v%%=*}; opts=${v#*=}
    for r in 0.25 0.5; do
        heal_one "$name" $r $opts &
    done
done
(ev "$fix" unpruned; ev "$w/reap-0.25" reap-0.25; ev "$w/reap-0.5" reap-0.5) &
wait
