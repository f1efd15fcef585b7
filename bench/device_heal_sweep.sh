#!/usr/bin/env bash
# Device run on qwen3-moe-tiny (gpu/fixture, data from gpu/data.tar.xz): the collector benchmark alone on the GPU
# first (unless NO_COLLECT=1), then bench/heal_sweep.sh with the given variants, stopped at a deadline;
# everything measured is packed into OUT/results.tar.gz.
#   bash bench/device_heal_sweep.sh OUT SECONDS NAME="heal options" ...
set -u
out=$1; budget=$2; shift 2
. bench/device_lib.sh
setup_work
if [ "${NO_COLLECT:-0}" != 1 ]; then
    python3 bench/collect_gpu.py --data $w/data/calib --tokenizer gpu/fixture --workdir /tmp/cb --tiles --ablate \
        --out $w/collect_gpu_h200.json > $w/collect_gpu.log 2>&1
    rm -rf /tmp/cb
fi
setsid bash bench/heal_sweep.sh gpu/fixture $w/data $w/heal "$@" > $w/heal.log 2>&1 &
finish $((budget)) $out $!
