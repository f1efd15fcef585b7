#!/usr/bin/env bash
# Issue 23's matrix on one fixture: drop / novices / lsq / hc-smoe / mc-smoe, each with and without the refit,
# for the best three criteria of the quality table (recon, gated_sq, mone; hc-smoe and mc-smoe choose their own
# groups, so they run once), and auto by the real loss with and without the refit; 25% and 50% removed.
# Every row is bench/merge_quality.py (prune under /usr/bin/time, then the quality table's evaluation), JOBS at once.
#   OUT=dir FIXTURE=path NAME=even DEVICE=cuda JOBS=8 DEADLINE=540 bash bench/merge_matrix.sh
# Statistics: STATS (a `collect --merge-stats` file), else collected here with the quality table's protocol
# (256 x 512 tokens of calib, 32 held out, float32) and copied to OUT. DATA: a folder with calib/ and eval/
# (default: unpacked from bench/work/gpu-bundle.tar.xz, or ../shared/data). ROWS: a file of
# "criterion variant ratio" lines to run instead of the whole matrix.
set -u
: "${OUT:?set OUT}" "${FIXTURE:?set FIXTURE}"
NAME=${NAME:-fixture}; DEVICE=${DEVICE:-cuda}; JOBS=${JOBS:-8}; DEADLINE=${DEADLINE:-540}
REFIT_TOKENS=${REFIT_TOKENS:-65536}; REFIT_STEPS=${REFIT_STEPS:-200}; MAX_TOKENS=${MAX_TOKENS:-16384}
W=${WORK:-/tmp/merge-matrix-$NAME}; START=$(date +%s); END=$((START + DEADLINE))
mkdir -p "$OUT/rows" "$OUT/logs" "$W/tmp"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${THREADS:-2}
if [ -z "${DATA:-}" ]; then
    if [ -f bench/work/gpu-bundle.tar.xz ]; then
        tar -xJf bench/work/gpu-bundle.tar.xz -C "$W" data && DATA=$W/data
    else
        DATA=../shared/data
    fi
fi
if [ -z "${STATS:-}" ]; then
    STATS=$W/mstats-$NAME.safetensors
    /usr/bin/time -v python3 -m surgery.cli collect "$FIXTURE" -d "$DATA/calib" -o "$STATS" --samples 256 --seq-len 512 \
        --holdout 32 --dtype float32 --merge-stats --device "$DEVICE" --overwrite > "$OUT/logs/collect.log" 2>&1 \
        || { tail -5 "$OUT/logs/collect.log"; exit 1; }
    cp "$STATS" "$OUT/"
    echo "collect: $SECONDS s"
fi
rows=$W/rows.txt
if [ -n "${ROWS:-}" ]; then cp "$ROWS" "$rows"; else
    : > "$rows"
    for r in 0.25 0.5; do  # the refit rows first: they take longest
        echo "auto auto+refit $r" >> "$rows"
        for c in recon gated_sq mone; do for v in drop novices lsq; do echo "$c $v+refit $r" >> "$rows"; done; done
        for v in hc-smoe mc-smoe; do echo "recon $v+refit $r" >> "$rows"; done
    done
    for r in 0.25 0.5; do
        echo "auto auto $r" >> "$rows"
        for c in recon gated_sq mone; do for v in drop novices lsq; do echo "$c $v $r" >> "$rows"; done; done
        for v in hc-smoe mc-smoe; do echo "recon $v $r" >> "$rows"; done
    done
fi
one() {  # one "criterion variant ratio" row, stopped at the deadline
    local c=$1 v=$2 r=$3 left=$((END - $(date +%s) - 5)) tag="$1-${2/+/_}-$3"  # no "+" in names: it does not travel back
    [ $left -gt 20 ] || { echo "skipped: $tag"; return 0; }
    timeout -k 5 $left python3 bench/merge_quality.py --model "$FIXTURE" --stats "$STATS" --eval "$DATA/eval" \
        --calib-text "$DATA/calib" --ratios "$r" --criteria "$c" --variants "$v" --refit-tokens "$REFIT_TOKENS" \
        --refit-steps "$REFIT_STEPS" --max-tokens "$MAX_TOKENS" --device "$DEVICE" --out "$OUT/rows/$tag.jsonl" \
        --tmp "$W/tmp" > "$OUT/logs/$tag.log" 2>&1
    echo "$tag: rc $? at $(($(date +%s) - START)) s"
}
export -f one
export END START FIXTURE STATS DATA REFIT_TOKENS REFIT_STEPS MAX_TOKENS DEVICE OUT W
xargs -P "$JOBS" -L 1 bash -c 'one $0 $1 $2' < "$rows"
echo "done at $SECONDS s"
