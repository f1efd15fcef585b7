#!/usr/bin/env bash
# Issue 21 on this CPU: `heal --lora R` against full-weight healing on one fixture at 25% removed (REAP),
# layer-local stage only (the CPU target of issue 11; --no-synthesize to fit the time), evaluated with `eval` (4,096 tokens per eval file: this CPU is shared).
#   LOCAL_STEPS=50 TOKENS=16384 bench/heal_lora_cpu.sh FIXTURE STATS DATA_DIR OUT_DIR [RATIO [RANK ...]]
# RANK 0 = full-weight healing; default ranks 0 8 16 64. DATA_DIR holds calib/ and eval/.
# Print the table with bench/heal_table.py.
set -euo pipefail
fix=$1; stats=$2; data=$3; out=$4; ratio=${5:-0.25}; shift $(( $# < 5 ? $# : 5 ))
ranks=${*:-0 8 16 64}; steps=${LOCAL_STEPS:-200}; tokens=${TOKENS:-65536}
ms() { python -c "from surgery.cli import main; main()" "$@"; }
ev() { ms eval "$1" -d "$data/eval" --dtype float32 --max-tokens 4096 --json > "$2"; }
mkdir -p "$out"
[ -f "$out/eval-unpruned.json" ] || ev "$fix" "$out/eval-unpruned.json"
[ -d "$out/reap-$ratio" ] || ms prune "$fix" --stats "$stats" --criterion reap --ratio "$ratio" -o "$out/reap-$ratio"
[ -f "$out/eval-reap-$ratio.json" ] || ev "$out/reap-$ratio" "$out/eval-reap-$ratio.json"
for rank in $ranks; do
    name=local-r$rank-$ratio
    [ -f "$out/eval-$name.json" ] && continue
    /usr/bin/time -v python -c "from surgery.cli import main; main()" heal "$out/reap-$ratio" --teacher "$fix" \
        -d "$data/calib" --kd-steps 0 --tokens "$tokens" --no-synthesize --local-steps "$steps" --device cpu --lora $rank \
        -o "$out/$name" \
        --overwrite 2> "$out/$name.log"
    ev "$out/$name" "$out/eval-$name.json"
done
