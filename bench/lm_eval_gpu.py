"""Wall time per 1,000 lm-evaluation-harness requests of `moe-surgery eval --tasks` (issue 24), on GPU or CPU.

Loads the model with this project's loader, runs the task folder of bench/mc_task.py through lm-eval at
each batch size, and writes JSON: requests, seconds in the model's request calls and per 1,000 requests,
tokens/s (context + continuation tokens of every request), load seconds, peak host RSS (ru_maxrss) and
peak GPU memory (torch.cuda.max_memory_allocated).

The GPU machine has no lm_eval and no network: carry the wheels `bench/lm_eval_gpu_wheels.sh` downloads
(13 MB, pure Python) and install them there first:

  pip install -q --no-index --no-deps bench/work/gpu-wheels/*.whl && \
  PYTHONPATH=$PWD python3 bench/lm_eval_gpu.py --workdir $OUT --model gpu/fixture --tasks bench/work/mc-task \
      --device cuda --batch-sizes 8 64 256

(carry: bench/work/gpu-wheels, bench/work/mc-task, gpu/fixture = a copy of ../shared/fixtures/qwen3-moe-tiny).
Smoke test on CPU: --device cpu --limit 2 --batch-sizes 8.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from surgery.eval.tasks import TaskOptions, resolve_tasks, run_tasks, task_cache
from surgery.model.load import load_model, load_tokenizer


def request_tokens(tasks: Path, tokenizer, limit: int | None) -> int:
    """Tokens the requests hold (context + continuation, per choice) over the documents lm-eval evaluates."""
    total = 0
    for data in sorted(tasks.glob("*.jsonl")):
        lines = data.read_text().splitlines()[:limit] if limit else data.read_text().splitlines()
        for line in lines:
            item = json.loads(line)
            context = len(tokenizer(item["context"])["input_ids"])
            total += sum(context + len(tokenizer(c)["input_ids"]) for c in item["choices"])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path, help="where lm_eval_gpu.json is written")
    p.add_argument("--model", required=True, help="checkpoint folder (a fixture or a pruned variant)")
    p.add_argument("--tasks", required=True, type=Path, help="folder written by bench/mc_task.py")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lm_eval is not installed: pip install --no-index --no-deps bench/work/gpu-wheels/*.whl "
                 "(bench/lm_eval_gpu_wheels.sh downloads them)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device, args.dtype), load_tokenizer(args.model)
    load_seconds = time.perf_counter() - t0
    tokens = request_tokens(args.tasks, tokenizer, args.limit)
    gpu = args.device.startswith("cuda")
    runs = []
    with task_cache() as cache:
        tasks, manager = resolve_tasks([str(args.tasks)], cache)
        for batch_size in args.batch_sizes:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            r = run_tasks(model, tokenizer, tasks, manager, TaskOptions(limit=args.limit), batch_size=batch_size)
            t = r["timing"]
            accs = [e["metrics"]["acc"] for e in r["results"].values()]
            runs.append({"batch_size": batch_size, **t, "tokens": tokens,
                         "tokens_per_second": round(tokens / t["request_seconds"], 1),
                         "mean_acc": sum(accs) / len(accs),
                         "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else None})
            print(json.dumps(runs[-1]), flush=True)
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "limit": args.limit,
              "gpu": torch.cuda.get_device_name() if gpu else None, "load_seconds": round(load_seconds, 2),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "runs": runs}
    (args.workdir / "lm_eval_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
