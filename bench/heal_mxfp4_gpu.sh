#!/usr/bin/env bash
# Issue 19: whole-command wall time and peak host RSS of `heal --kd-tokens 1000000 --lora 16` on the gpt-oss-20b-geometry
# MXFP4 student (25% removed by a fixed plan), on one H200:  bash bench/heal_mxfp4_gpu.sh   (writes under $OUT)
set -x
python bench/quantized_gpu.py --workdir /tmp/qg --out $OUT/q.jsonl --steps verify --keep > $OUT/prep.log 2>&1
W=/tmp/qg/gpt-oss
python -c "import json;print(json.dumps({'keep':{str(l):list(range(24)) for l in range(24)}}))" > $W/plan.json
python -m surgery.cli prune $W/model --plan $W/plan.json -o $W/pruned > $OUT/prune.log 2>&1
python -c "import subprocess,sys,time,resource;t=time.time();r=subprocess.call(sys.argv[1:]);print('WALL_S',round(time.time()-t,1),'MAXRSS_KiB',resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)" python -m surgery.cli heal $W/pruned --teacher $W/model -d $W/calib.jsonl -o $W/healed --kd-tokens 1000000 --seq-len 1024 --device cuda --lora 16 --local-steps 0 --batch-size 4 > $OUT/heal.log 2>&1
tail -3 $OUT/heal.log
python -c "import json;d=json.load(open('$W/healed/pruning.json'));print(json.dumps(d.get('heal'),indent=1)[:6000])" | tee $OUT/heal_record.json
du -sh $W/model $W/pruned $W/healed
