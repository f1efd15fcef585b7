#!/usr/bin/env bash
# Wheels of lm_eval 0.4.13 and the packages it needs that the GPU machine's image lacks (Python 3.12, no network
# there), into bench/work/gpu-wheels (13 MB): carry that folder and `pip install --no-index --no-deps` them.
# The image already has accelerate, peft, pandas, pyarrow, scikit-learn, sacrebleu, jinja2, xxhash, aiohttp.
set -euo pipefail
out=${1:-bench/work/gpu-wheels}
mkdir -p "$out"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$out" \
    lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 pytablewriter==1.2.1 \
    DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
    chardet==6.0.0.post1 nltk==3.10.4 more_itertools==11.2.1
# Published as source only; pure Python, so a wheel built here installs there.
pip wheel -q --no-deps -w "$out" sqlitedict==2.1.0 rouge-score==0.1.2 word2number==1.1
ls "$out"
