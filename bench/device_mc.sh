#!/usr/bin/env bash
# Issue 24 on the GPU machine (and issue 22's `heal --recipe moe-pruner` comparison), one call per fixture and
# group of steps:
#   OUT=$OUT FIXTURE=gpu/fixture NAME=even STEPS=collect,timing,mc DEADLINE=540 bash bench/device_mc.sh
# carry: gpu/fixture (a copy of a fixture) and bench/work/gpu-bundle.tar.xz (bench/gpu_bundle.sh: lm_eval and
# the packages the image lacks, the task of bench/mc_task.py, data/calib and data/eval).
# STEPS is a comma list; steps joined by + run side by side (collect,timing,mc+heal,recipe: the MC evaluation
# leaves the GPU mostly idle, so the heals run beside it; collect and recipe may not be in a + group).
# Steps run in the order given; one is skipped ("skipped: deadline") when fewer seconds of DEADLINE are left
# than it needs (its time in an earlier call on this machine, else NEED_<STEP>), and everything stops at
# DEADLINE. State lives in $TMPROOT/devmc-NAME: a later call on the same warm machine reuses statistics,
# checkpoints and finished rows and continues where a stopped one ended.
#   collect  the quality table's statistics (issue 5): 256 x 512 tokens of calib, 32 held out, float32
#   mc       bench/mc_quality.py, one process per model side by side: unpruned, CRITERION (recon) at 0.25 and
#            0.5, NOVICE_CRITERION (mone, the criterion of issue 8's novice table) + novices at 0.25 and 0.5:
#            accuracy on the whole task (500 items per domain) and perplexity (MAX_TOKENS per eval file)
#   timing   bench/lm_eval_gpu.py on the unpruned fixture at batch 8, 64, 256 (TIMING_LIMIT items per domain)
#   heal     issue 11's GPU protocol: REAP statistics from 128 x 512 tokens, prune reap 0.25 / 0.5, `heal` with
#            its defaults (both side by side), then accuracy + perplexity of the healed and removal checkpoints
#   recipe   issue 22: heal reap-0.25 with --recipe moe-pruner (started beside the heal step's runs when both
#            steps are asked), then perplexity, KL and top-1 against the fixture: removal, default, moe-pruner
#   lora     issue 21: heal reap-0.25 and reap-0.5 with --lora R (R in LORA_RANKS) and with full distillation, all
#            side by side, then perplexity, KL and top-1 of each and of the removal checkpoints
# OUT gets rows-NAME.jsonl (every row), summary-NAME.md (the tables, also printed), log-NAME.txt (steps and
# log tails) and lm_eval_gpu-NAME.json. CPU smoke test: DEVICE=cpu LIMIT=1 SAMPLES=8 MAX_TOKENS=512 ...
set -u
: "${OUT:?set OUT}"
FIXTURE=${FIXTURE:-gpu/fixture}; NAME=${NAME:-even}; STEPS=${STEPS:-collect,timing,mc}; DEADLINE=${DEADLINE:-540}
DEVICE=${DEVICE:-cuda}; BUNDLE=${BUNDLE:-bench/work/gpu-bundle.tar.xz}; TMPROOT=${TMPROOT:-/tmp}
BATCH=${BATCH:-64}; LIMIT=${LIMIT:-}; SAMPLES=${SAMPLES:-256}; MAX_TOKENS=${MAX_TOKENS:-16384}; JOBS=${JOBS:-5}
# BATCH 64: the rows are scored in float32, and at 256 the perplexity windows' attention (4 GiB a call) of five
# side-by-side evaluations (46 GiB each) and two heals ran out of the H200's memory
CRITERION=${CRITERION:-recon}; NOVICE_CRITERION=${NOVICE_CRITERION:-mone}; HEAL_SAMPLES=${HEAL_SAMPLES:-128}
KD_TOKENS=${KD_TOKENS:-}; HEAL_EXTRA=${HEAL_EXTRA:-}; HEAL_REMOVAL=${HEAL_REMOVAL:-1}
TIMING_LIMIT=${TIMING_LIMIT-100}; TIMING_BATCHES=${TIMING_BATCHES:-8 64 256}; TIMING_DTYPE=${TIMING_DTYPE:-bfloat16}
declare -A NEED=([collect]=${NEED_COLLECT:-45} [mc]=${NEED_MC:-90} [timing]=${NEED_TIMING:-60}
                 [heal]=${NEED_HEAL:-240} [recipe]=${NEED_RECIPE:-200} [lora]=${NEED_LORA:-300})
LORA_RANKS=${LORA_RANKS:-8 16 64}
MARGIN=10                                   # seconds kept at the end to write OUT
W=$TMPROOT/devmc; S=$TMPROOT/devmc-$NAME; CALL=$(date +%H:%M:%S)
mkdir -p "$OUT" "$S/rows" "$S/recipe"
export PYTHONPATH=$PWD:$W/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 HF_HOME=$W/hf
cli="python3 -m surgery.cli"
declare -A PIDS=()

tmo() {  # tmo CMD...: run CMD, stopped MARGIN seconds before DEADLINE (exit 124)
    local left=$((DEADLINE - MARGIN - SECONDS))
    [ $left -gt 0 ] || return 124
    timeout -k 5 $left "$@"
}
unpack() {  # the bundle into $W, once per bundle
    local sum; sum=$(md5sum < "$BUNDLE" | cut -c1-32)
    if [ "$(cat $W/.bundle 2>/dev/null)" != "$sum" ]; then
        rm -rf $W; mkdir -p $W && tar -xJf "$BUNDLE" -C $W && echo "$sum" > $W/.bundle
    fi
    { echo "call $CALL: NAME=$NAME STEPS=$STEPS DEADLINE=$DEADLINE DEVICE=$DEVICE FIXTURE=$FIXTURE"
      [[ $DEVICE == cuda* ]] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
    } >> $S/env.txt 2>&1
    # lm_eval, datasets 5.2 and the image's pyarrow/fsspec/huggingface_hub: import them and read one task's data
    if python3 -c "from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import get_task_dict
from surgery.eval.tasks import resolve_tasks, task_cache
with task_cache() as cache:
    tasks, manager = resolve_tasks(['$W/mc-task/mc_code.yaml'], cache)
    print('lm_eval reads the task:', len(list(next(iter(get_task_dict(tasks, manager).values())).eval_docs)), 'items')
" 2>&1 | grep -v examples/s >> $S/env.txt; [ ${PIPESTATUS[0]} = 0 ]; then
        LM_EVAL=1
    else
        LM_EVAL=0; echo "lm_eval does NOT work here: accuracy skipped, perplexity only" >> $S/env.txt
    fi
}
mc_jobs() {  # mc_jobs PREFIX "LABEL[=FOLDER]"... -- MC_QUALITY_ARGS...: one bench/mc_quality.py per label
    local prefix=$1 specs=() spec label slug rc=0 pid pids=() extra tasks=() i=0
    shift
    while [ "$1" != -- ]; do specs+=("$1"); shift; done; shift
    local threads=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
    [ $LM_EVAL = 1 ] && tasks=(--tasks $W/mc-task)
    for spec in "${specs[@]}"; do
        label=${spec%%=*}; slug=$(printf %02d $i)-${label// /_}; extra=(); i=$((i + 1))
        [ "$spec" != "$label" ] && extra=(--extra "$spec")
        while [ $(jobs -rp | wc -l) -ge $((JOBS + ${#PIDS[@]})) ]; do wait -n; done
        tmo env OMP_NUM_THREADS=$threads python3 bench/mc_quality.py --model "$FIXTURE" --only "$label" --resume \
            "${tasks[@]}" ${LIMIT:+--limit $LIMIT} --eval $W/data/eval --max-tokens $MAX_TOKENS --batch-size $BATCH \
            --device $DEVICE --workdir $S/ckpt --out "$S/rows/$prefix-$slug.jsonl" "${extra[@]}" "$@" \
            > "$S/log-$prefix-$slug.txt" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait $pid || rc=$?; done
    return $rc
}
step_collect() {
    [ -f $S/stats.safetensors ] && { echo "statistics present"; return 0; }
    local holdout=$(( SAMPLES / 8 < 1 ? 1 : (SAMPLES / 8 > 32 ? 32 : SAMPLES / 8) ))
    tmo $cli collect "$FIXTURE" -d $W/data/calib -o $S/stats.part.safetensors --samples $SAMPLES --seq-len 512 \
        --holdout $holdout --dtype float32 --device $DEVICE --batch-size 16 --overwrite \
        && mv $S/stats.part.safetensors $S/stats.safetensors
}
step_mc() {
    [ -f $S/stats.safetensors ] || step_collect || return
    local labels=(unpruned) r
    for r in 0.25 0.5; do labels+=("$CRITERION $r" "$NOVICE_CRITERION $r novices"); done
    mc_jobs mc "${labels[@]}" -- --stats $S/stats.safetensors --criterion $CRITERION --ratios 0.25 0.5 \
        --novices --novice-criterion $NOVICE_CRITERION
}
step_timing() {
    [ -f $S/timing/lm_eval_gpu.json ] && { echo "timing present"; return 0; }
    [ $LM_EVAL = 1 ] || { echo "lm_eval does not import"; return 3; }
    tmo python3 bench/lm_eval_gpu.py --workdir $S/timing --model "$FIXTURE" --tasks $W/mc-task --device $DEVICE \
        --dtype $TIMING_DTYPE --batch-sizes $TIMING_BATCHES ${TIMING_LIMIT:+--limit $TIMING_LIMIT}
}
heal_inputs() {  # issue 11: REAP statistics from 128 x 512 tokens (no hold-out), the removal checkpoints
    local r
    [ -f $S/reap-stats.safetensors ] || tmo $cli collect "$FIXTURE" -d $W/data/calib --samples $HEAL_SAMPLES \
        --seq-len 512 --holdout 0 -o $S/reap-stats.safetensors --dtype float32 --device $DEVICE --overwrite || return
    for r in 0.25 0.5; do
        [ -f $S/reap-$r/pruning.json ] || tmo $cli prune "$FIXTURE" --stats $S/reap-stats.safetensors \
            --criterion reap --ratio $r -o $S/reap-$r --overwrite || return
    done
}
start_heal() {  # start_heal NAME RATIO [OPTION...]: heal reap-RATIO into NAME-RATIO in the background
    local run=$1-$2 r=$2; shift 2
    [ -f $S/$run/pruning.json ] || [ -n "${PIDS[$run]:-}" ] && return 0
    ( start=$EPOCHREALTIME
      tmo $cli heal $S/reap-$r --teacher "$FIXTURE" -d $W/data/calib -o $S/$run --overwrite --device $DEVICE \
          ${KD_TOKENS:+--kd-tokens $KD_TOKENS} $HEAL_EXTRA "$@" > $S/log-heal-$run.txt 2>&1
      rc=$?
      echo "{\"run\": \"$run\", \"rc\": $rc, \"seconds\": $(awk "BEGIN {print $EPOCHREALTIME - $start}"), \"kd_tokens\": \"${KD_TOKENS:-default}\"}" >> $S/heal-walls.jsonl
      exit $rc ) &
    PIDS[$run]=$!
}
wait_heal() {  # wait_heal RUN...: wait for these heals; fails when one did not write its checkpoint
    local run rc=0
    for run in "$@"; do
        [ -n "${PIDS[$run]:-}" ] && { wait ${PIDS[$run]}; unset "PIDS[$run]"; }
        [ -f $S/$run/pruning.json ] || { echo "heal $run: no checkpoint (see log-heal-$run.txt)"; rc=1; }
    done
    return $rc
}
step_heal() {
    heal_inputs || return
    start_heal healed 0.25; start_heal healed 0.5
    [[ ,${STEPS//+/,}, == *,recipe,* ]] && start_heal moe-pruner 0.25 --recipe moe-pruner
    local rc=0 specs=() r
    wait_heal healed-0.25 healed-0.5 || rc=1
    for r in 0.25 0.5; do [ -f $S/healed-$r/pruning.json ] && specs+=("healed reap $r=$S/healed-$r"); done
    [ $HEAL_REMOVAL = 1 ] && for r in 0.25 0.5; do specs+=("reap $r=$S/reap-$r"); done
    mc_jobs heal "${specs[@]}" -- --no-unpruned --ratios || rc=$?
    return $rc
}
eval_runs() {  # eval_runs KEY:FOLDER...: perplexity, KL and top-1 against the fixture into recipe/eval-KEY.json
    local spec key folder rc=0 pid pids=()
    for spec in "$@"; do
        key=${spec%%:*}; folder=$S/${spec#*:}
        [ -f $S/recipe/eval-$key.json ] || [ ! -f $folder/pruning.json ] && continue
        while [ $(jobs -rp | wc -l) -ge $((JOBS + ${#PIDS[@]})) ]; do wait -n; done
        ( start=$EPOCHREALTIME
          tmo $cli eval $folder -d $W/data/eval --reference "$FIXTURE" --dtype float32 --max-tokens $MAX_TOKENS \
              --batch-size $BATCH --device $DEVICE --json > $S/recipe/$key.part 2> $S/log-eval-$key.txt || exit
          python3 -c "import json, sys; r = json.load(open(sys.argv[1])); r['wall_seconds'] = round(float(sys.argv[2]), 1)
json.dump(r, open(sys.argv[3], 'w'))" $S/recipe/$key.part $(awk "BEGIN {print $EPOCHREALTIME - $start}") \
              $S/recipe/eval-$key.json ) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait $pid || rc=$?; done
    return $rc
}
step_recipe() {
    heal_inputs || return
    start_heal healed 0.25; start_heal moe-pruner 0.25 --recipe moe-pruner
    local rc=0
    wait_heal healed-0.25 moe-pruner-0.25 || rc=1
    eval_runs removal:reap-0.25 default:healed-0.25 moe-pruner:moe-pruner-0.25 || rc=$?
    return $rc
}
step_lora() {  # issue 21: heal --lora R for R in LORA_RANKS against full distillation, reap 0.25 and 0.5
    heal_inputs || return
    local r rank rc=0 runs=() specs=()
    for r in 0.25 0.5; do
        start_heal healed $r; runs+=(healed-$r); specs+=(removal-$r:reap-$r full-$r:healed-$r)
        for rank in $LORA_RANKS; do
            start_heal lora$rank $r --lora $rank; runs+=(lora$rank-$r); specs+=(lora$rank-$r:lora$rank-$r)
        done
    done
    wait_heal "${runs[@]}" || rc=1
    eval_runs "${specs[@]}" || rc=$?
    return $rc
}
publish() {  # OUT: rows, summary, log tails, timing JSON (each written aside, then moved: steps side by side)
    local tmp=$S/publish.$BASHPID; mkdir -p $tmp
    python3 bench/device_mc_table.py --state $S --rows $tmp/rows > $tmp/summary 2>> $S/env.txt
    { cat $S/env.txt
      for f in $S/log-*.txt; do
          [ -f "$f" ] || continue
          echo "== ${f##*/}"; tr '\r' '\n' < "$f" | grep -v -E '[0-9]+%\||examples/s\]|^\{"model"|^\||^\s*$' | cut -c1-300 \
              | tail -n ${LOG_LINES:-25}
      done
    } > $tmp/log
    mv $tmp/rows "$OUT/rows-$NAME.jsonl"; mv $tmp/summary "$OUT/summary-$NAME.md"; mv $tmp/log "$OUT/log-$NAME.txt"
    [ -f $S/timing/lm_eval_gpu.json ] && cp $S/timing/lm_eval_gpu.json "$OUT/lm_eval_gpu-$NAME.json"
    rm -rf $tmp
    return 0
}
run_step() {  # run_step STEP: skip it when too few seconds are left, else run it and record how it ended
    local step=$1 left=$((DEADLINE - MARGIN - SECONDS)) need t0=$SECONDS rc status
    need=$(cat $S/need-$step 2>/dev/null || echo ${NEED[$step]})
    if [ $step = recipe ]; then              # its heals done: only the evaluations are left; running: let it finish
        [ -f $S/healed-0.25/pruning.json ] && [ -f $S/moe-pruner-0.25/pruning.json ] && need=${NEED_RECIPE_EVAL:-30}
        [ -n "${PIDS[moe-pruner-0.25]:-}" ] && need=0
    fi
    if [ $left -lt $need ]; then
        status="skipped: deadline ($left s left, about $need s needed)"
    else
        step_$step >> $S/log-$step.txt 2>&1
        rc=$?
        case $rc in
            0) status=ok; echo $((SECONDS - t0)) > $S/need-$step ;;
            124|137) status="stopped: deadline" ;;
            *) status="failed (exit $rc, see log-$step.txt)" ;;
        esac
    fi
    echo "{\"call\": \"$CALL\", \"name\": \"$step\", \"status\": \"$status\", \"seconds\": $((SECONDS - t0))}" >> $S/steps.jsonl
    echo "$step: $status ($((SECONDS - t0)) s)"
    publish
}

for group in ${STEPS//,/ }; do
    for step in ${group//+/ }; do
        [ -n "${NEED[$step]:-}" ] || { echo "unknown step $step" >&2; exit 2; }
        [[ $group == *+* && $step =~ ^(collect|recipe)$ ]] && { echo "$step: not in a + group" >&2; exit 2; }
    done
done
unpack
for group in ${STEPS//,/ }; do
    if [[ $group == *+* ]]; then             # side by side: each step in a subshell that waits for its children
        for step in ${group//+/ }; do (run_step $step; wait) & done
        wait
    else
        run_step $group
    fi
done
for run in "${!PIDS[@]}"; do wait ${PIDS[$run]}; done   # a moe-pruner heal started without the recipe step
publish
cat "$OUT/summary-$NAME.md"
ls -la "$OUT"
