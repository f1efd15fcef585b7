"""Accuracy next to perplexity (issue 24): the multiple-choice task of bench/mc_task.py on a fixture,
unpruned and pruned (a criterion at each ratio, optionally with MoNE novices), through `moe-surgery eval`'s
pipeline (the project's loader, lm-evaluation-harness for the task, perplexity on the eval text).

  python bench/mc_quality.py --model ../shared/fixtures/qwen3-moe-tiny --stats stats.safetensors \
      --criterion recon --ratios 0.25 0.5 --tasks bench/work/mc-task --eval ../shared/data/eval \
      --workdir bench/work/mcq-even --out bench/work/mcq-even.jsonl [--limit 100] [--novices] [--device cpu]

Writes one JSON line per model (geomean perplexity, per-task accuracy, mean accuracy over tasks, seconds
per 1,000 requests) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from surgery.eval.tasks import TaskOptions
from surgery.pipeline.evaluate import EvalOptions, evaluate_model
from surgery.pipeline.prune import WriteOptions, prune
from surgery.pipeline.score_options import ScoreOptions


def variants(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(label, folder): the unpruned model, then one pruned checkpoint per ratio (and novices variant)."""
    out = [("unpruned", Path(args.model))]
    for ratio in args.ratios:
        for novices in ([False, True] if args.novices else [False]):
            label = f"{args.criterion} {ratio:g}" + (" novices" if novices else "")
            folder = args.workdir / label.replace(" ", "-")
            if not (folder / "pruning.json").is_file():
                prune(args.model, folder, scoring=ScoreOptions(args.criterion, ratio=ratio), stats_path=args.stats,
                      write=WriteOptions(overwrite=True, novices=novices), echo=lambda *a, **k: None)
            out.append((label, folder))
    return out


def measure(label: str, folder: Path, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    options = EvalOptions(max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                          device=args.device, dtype="float32")
    result = evaluate_model(str(folder), (args.eval,) if args.eval else (), options,
                            tasks=TaskOptions(tasks=(str(args.tasks),), limit=args.limit))
    runs = result["tasks"]["model"]
    acc = {t: e["metrics"]["acc"] for t, e in runs["results"].items()}
    acc_norm = {t: e["metrics"].get("acc_norm") for t, e in runs["results"].items()}
    row = {"model": label, "folder": str(folder), "geomean_ppl": result.get("geomean_ppl"),
           "mean_acc": sum(acc.values()) / len(acc), "mean_acc_norm": sum(acc_norm.values()) / len(acc_norm),
           "acc": acc, "acc_norm": acc_norm, "items": {t: e["samples"] for t, e in runs["results"].items()},
           "timing": runs["timing"], "seconds": round(time.perf_counter() - t0, 1)}
    if "files" in result:
        row["ppl"] = {f["domain"]: f["ppl"] for f in result["files"]}
    return row


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["acc"])
    head = ["model", "geomean ppl", "mean acc", "mean acc_norm", *[t.removeprefix("mc_") for t in tasks], "s / 1k req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = f"{r['geomean_ppl']:.2f}" if r["geomean_ppl"] else "-"
        cells = [r["model"], ppl, f"{r['mean_acc']:.3f}", f"{r['mean_acc_norm']:.3f}",
                 *[f"{r['acc'][t]:.3f}" for t in tasks], f"{r['timing']['seconds_per_1000_requests']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, type=Path)
    p.add_argument("--criterion", default="recon")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--novices", action="store_true", help="also the MoNE-novice variant of each ratio")
    p.add_argument("--tasks", required=True, type=Path, help="folder written by bench/mc_task.py")
    p.add_argument("--eval", help="text for perplexity (a folder of .jsonl); none: accuracy only")
    p.add_argument("--limit", type=int, help="items per task (default: all)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints in --workdir")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, folder in variants(args):
        rows.append(measure(label, folder, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        if not args.keep and folder.parent == args.workdir:
            shutil.rmtree(folder)
    print(table(rows))


if __name__ == "__main__":
    main()
