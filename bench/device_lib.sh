# Shared by the device scripts (source it): the work folder with the carried data unpacked, the
# environment, a note of the GPU, and a deadline-bounded wait that packs what was measured.
setup_work() {  # setup_work: /tmp/w with data/calib and data/eval from gpu/data.tar.xz
    w=/tmp/w; rm -rf $w; mkdir -p $w/tmp
    tar -xJf gpu/data.tar.xz -C $w
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $w/gpu.txt
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $w/gpu.txt
}
rounds_jobs() {  # rounds_jobs CRITERION...: bench/rounds_quality.py for each criterion at 25% and 50%, in the
    # background (MODES picks the schedules); their pids are added to the array `pids`
    local c r
    for c in "$@"; do
        for r in 0.25 0.5; do
            setsid python3 bench/rounds_quality.py --model gpu/fixture --data $w/data/calib --eval $w/data/eval \
                --criteria $c --ratio $r --rounds 4 --samples 256 --seq-len 512 --max-tokens 4096 --device ${DEV:-cuda} \
                --modes ${MODES:-one-shot rounds rounds-heal} --out $w/rounds-$c-$r.jsonl --tmp $w/tmp \
                > $w/rounds-$c-$r.log 2>&1 &
            pids+=($!)
        done
    done
}
finish() {  # finish END OUT PID...: wait for the jobs until SECONDS reaches END, stop the rest, pack $w into OUT
    local end=$1 out=$2 p alive; shift 2
    while [ $SECONDS -lt $end ]; do
        alive=0; for p in "$@"; do kill -0 $p 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 5
    done
    for p in "$@"; do kill -- -$p 2>/dev/null; done
    echo "stopped after $SECONDS s" >> $w/gpu.txt
    (cd $w && tar -czf $out/results.tar.gz --exclude='*.safetensors' --exclude=tmp --exclude=data \
        --exclude='heal/*-0.25' --exclude='heal/*-0.5' .)
    ls -la $out
}
