#!/usr/bin/env bash
# Device run on qwen3-moe-tiny (carried as gpu/fixture, data as gpu/data.tar.xz): the heal benchmark
# (bench/heal_sweep.sh: the defaults and local only) and MC-Suite's estimate → prune → heal study (bench/rounds_quality.py) side by side,
# stopped at a deadline; everything measured is packed into OUT/results.tar.gz.
#   bash bench/device_even.sh OUT [SECONDS]
set -u
out=$1; budget=${2:-540}
. bench/device_lib.sh
setup_work
setsid bash bench/heal_sweep.sh gpu/fixture $w/data $w/heal defaults="" local="--kd-steps 0" > $w/heal.log 2>&1 &
pids=($!)
rounds_jobs mcs-ege mcs-euf recon
finish $((SECONDS + budget)) $out "${pids[@]}"
