#!/usr/bin/env bash
# Device run on qwen3-moe-tiny-skewed (carried as gpu/fixture, data as gpu/data.tar.xz): first the collector
# benchmark alone on the GPU (bench/collect_gpu.py, issue 4), then MC-Suite's estimate → prune → heal study
# (bench/rounds_quality.py, issue 12) for the criteria given, side by side, stopped at a deadline; everything
# measured is packed into OUT/results.tar.gz.
#   bash bench/device_skewed.sh OUT SECONDS CRITERION...
set -u
out=$1; budget=$2; shift 2
w=/tmp/w; rm -rf $w; mkdir -p $w/tmp
tar -xJf gpu/data.tar.xz -C $w
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
end=$((SECONDS + budget))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $w/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $w/gpu.txt
timeout 240 python3 bench/collect_gpu.py --data $w/data/calib --tokenizer gpu/fixture --workdir /tmp/cb \
    --out $w/collect_gpu.json > $w/collect_gpu.log 2>&1
echo "collector benchmark done after $SECONDS s" >> $w/gpu.txt
rm -rf /tmp/cb
pids=()
for c in "$@"; do
    for r in 0.25 0.5; do
        setsid python3 bench/rounds_quality.py --model gpu/fixture --data $w/data/calib --eval $w/data/eval \
            --criteria $c --ratio $r --rounds 4 --samples 256 --seq-len 512 --max-tokens 4096 --device cuda \
            --modes ${MODES:-one-shot rounds rounds-heal} --out $w/rounds-$c-$r.jsonl --tmp $w/tmp > $w/rounds-$c-$r.log 2>&1 &
        pids+=($!)
    done
done
while [ $SECONDS -lt $end ]; do
    alive=0; for p in "${pids[@]}"; do kill -0 $p 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 5
done
for p in "${pids[@]}"; do kill -- -$p 2>/dev/null; done
echo "stopped after $SECONDS s" >> $w/gpu.txt
cd $w && tar -czf $out/results.tar.gz --exclude='*.safetensors' --exclude=tmp --exclude=data .
ls -la $out
