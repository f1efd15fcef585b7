#!/usr/bin/env bash
# One compressed file for the GPU runs of issue 24 (bench/device_mc.sh unpacks it there):
#   site/     lm_eval 0.4.13 and the packages it needs that the GPU image lacks, installed from the wheels of
#             bench/lm_eval_gpu_wheels.sh (pure Python, no .pyc), lm-eval's built-in task YAMLs removed
#             (local YAML tasks need none of them) and nltk/rouge_score (only lm-eval's ROUGE metric uses them);
#   mc-task/  the multiple-choice task of bench/mc_task.py;
#   data/     calib/ and eval/ of ../shared/data.
# Before packing, `moe-surgery eval FIXTURE --tasks <one task> --limit 1` runs here on CPU with the packed
# packages hiding the ones installed here (a guard refuses to import them from anywhere but site/), so a
# module the strip removed by mistake fails here and not on the device.
#   bash bench/gpu_bundle.sh            # -> bench/work/gpu-bundle.tar.xz (about 3 MB)
# Environment: WHEELS, TASKS, DATA, FIXTURE (for the check), BUNDLE (output), CHECK=0 skips the check.
set -euo pipefail
wheels=${WHEELS:-bench/work/gpu-wheels}
tasks=${TASKS:-bench/work/mc-task}
data=${DATA:-../shared/data}
fixture=${FIXTURE:-../shared/fixtures/qwen3-moe-tiny}
bundle=${BUNDLE:-bench/work/gpu-bundle.tar.xz}
repo=$PWD
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

python3 -m pip install -q --no-index --no-deps --no-compile --target "$stage/site" --python-version 3.12 \
    --implementation cp --only-binary=:all: "$wheels"/*.whl 2>&1 | grep -v "as the 'root' user" || true
site=$stage/site
# Every top-level module the wheels brought: the guard hides the copies installed on this machine.
hidden=$(cd "$site" && ls | grep -v -e '\.dist-info$' -e '^bin$' | sed 's/\.py$//' | tr '\n' ' ')
find "$site/lm_eval/tasks" -mindepth 1 -maxdepth 1 \( -type d -o -name '*.md' \) -exec rm -rf {} +
rm -rf "$site/bin" "$site/nltk" "$site"/nltk-*.dist-info "$site/rouge_score" "$site"/rouge_score-*.dist-info
find "$site" \( -name RECORD -o -name INSTALLER -o -name REQUESTED -o -name '*.pyi' \) -path '*' -delete
find "$site" -depth \( -name __pycache__ -o -name tests -o -name test \) -type d -exec rm -rf {} +
if find "$site" \( -name '*.so' -o -name '*.pyc' \) | grep -q .; then
    echo "compiled files in the bundle: they would be Python 3.11's" >&2; exit 1
fi
cp -r "$tasks" "$stage/mc-task"
mkdir -p "$stage/data"
cp -r "$data/calib" "$data/eval" "$stage/data/"

if [ "${CHECK:-1}" != 0 ]; then
    mkdir -p "$stage/guard" "$stage/check"
    cat > "$stage/guard/sitecustomize.py" <<EOF
"""Import the bundle's packages from the bundle only, as on the GPU image where they are not installed."""
import importlib.machinery
import sys

HIDDEN = set("$hidden".split())


class Guard:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if "." in name or name not in HIDDEN:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, ["$site"])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the bundle)", name=name)
        return spec


sys.meta_path.insert(0, Guard)
EOF
    first=$(ls "$stage/mc-task"/*.yaml | head -1)
    export HOME=$stage/check HF_HOME=$stage/check/hf HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
        PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$stage/guard:$site:$repo"
    (cd "$stage/check" && python3 -c "import lm_eval, datasets, evaluate, multiprocess, dill
for m in (lm_eval, datasets, evaluate, multiprocess, dill): assert m.__file__.startswith('$site'), m.__file__
print('check: imported from the bundle')" && python3 -m surgery.cli eval "$repo/$fixture" --tasks "$first" \
        --limit 1 --device cpu --json > "$stage/check.json" 2> "$stage/check.err") \
        || { tail -20 "$stage/check.err" >&2; exit 1; }
    python3 - "$stage/check.json" "$site" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
runs = r["tasks"]["model"]
assert runs["timing"]["requests"] > 0, runs
print("check: lm_eval", r["tasks"]["lm_eval_version"], "from the bundle:", json.dumps(runs["results"]))
EOF
    find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
fi
mkdir -p "$(dirname "$bundle")"
tar -cf - -C "$stage" site mc-task data | xz -9e -T1 > "$bundle.part"
mv "$bundle.part" "$bundle"
echo "$bundle: $(stat -c %s "$bundle") bytes ($(du -sb "$site" | cut -f1) bytes of packages unpacked)"
