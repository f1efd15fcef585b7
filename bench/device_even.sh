#!/usr/bin/env bash
# Device run on qwen3-moe-tiny (carried as gpu/fixture, data as gpu/data.tar.xz): the heal benchmark
# (bench/heal_gpu.sh) and MC-Suite's estimate → prune → heal study (bench/rounds_quality.py) side by side,
# stopped at a deadline; everything measured is packed into OUT/results.tar.gz.
#   bash bench/device_even.sh OUT [SECONDS]
set -u
out=$1; budget=${2:-540}
w=/tmp/w; rm -rf $w; mkdir -p $w/tmp
tar -xJf gpu/data.tar.xz -C $w
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $w/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $w/gpu.txt
setsid bash bench/heal_gpu.sh gpu/fixture $w/data $w/heal > $w/heal.log 2>&1 &
pids=($!)
for c in mcs-ege mcs-euf recon; do
    for r in 0.25 0.5; do
        setsid python3 bench/rounds_quality.py --model gpu/fixture --data $w/data/calib --eval $w/data/eval \
            --criteria $c --ratio $r --rounds 4 --samples 256 --seq-len 512 --max-tokens 4096 --device ${DEV:-cuda} \
            --modes ${MODES:-one-shot rounds rounds-heal} --out $w/rounds-$c-$r.jsonl --tmp $w/tmp > $w/rounds-$c-$r.log 2>&1 &
        pids+=($!)
    done
done
end=$((SECONDS + budget))
while [ $SECONDS -lt $end ]; do
    alive=0; for p in "${pids[@]}"; do kill -0 $p 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 5
done
for p in "${pids[@]}"; do kill -- -$p 2>/dev/null; done
echo "stopped after $SECONDS s" >> $w/gpu.txt
cd $w && tar -czf $out/results.tar.gz --exclude='*.safetensors' --exclude=tmp --exclude=data \
    --exclude='heal/reap-0.*' --exclude='heal/healed-0*' --exclude='heal/local-0*' --exclude='heal/lr1e-3-0*' --exclude='heal/all-0*' .
ls -la $out
