#!/usr/bin/env bash
# Device run on qwen3-moe-tiny-skewed (carried as gpu/fixture, data as gpu/data.tar.xz): first the collector
# benchmark alone on the GPU (bench/collect_gpu.py, issue 4), then MC-Suite's estimate → prune → heal study
# (bench/rounds_quality.py, issue 12) for the criteria given, side by side, stopped at a deadline; everything
# measured is packed into OUT/results.tar.gz.
#   bash bench/device_skewed.sh OUT SECONDS CRITERION...
set -u
out=$1; budget=$2; shift 2
. bench/device_lib.sh
end=$((SECONDS + budget))
setup_work
timeout 240 python3 bench/collect_gpu.py --data $w/data/calib --tokenizer gpu/fixture --workdir /tmp/cb \
    --out $w/collect_gpu.json > $w/collect_gpu.log 2>&1
echo "collector benchmark done after $SECONDS s" >> $w/gpu.txt
rm -rf /tmp/cb
pids=()
rounds_jobs "$@"
finish $end $out "${pids[@]}"
