"""Accuracy next to perplexity (issue 24): the multiple-choice task of bench/mc_task.py on a fixture,
unpruned and pruned (a criterion at each ratio, optionally with MoNE novices), through `moe-surgery eval`'s
pipeline (the project's loader, lm-evaluation-harness for the task, perplexity on the eval text).

  python bench/mc_quality.py --model ../shared/fixtures/qwen3-moe-tiny --stats stats.safetensors \
      --criterion recon --ratios 0.25 0.5 --tasks bench/work/mc-task --eval ../shared/data/eval \
      --workdir bench/work/mcq-even --out bench/work/mcq-even.jsonl [--limit 100] [--novices] [--device cpu]

Writes one JSON line per model (geomean perplexity, per-task accuracy, mean accuracy over tasks, seconds
per 1,000 requests, wall seconds) as soon as it is measured, and prints a Markdown table. `--extra LABEL=FOLDER`
adds checkpoints made elsewhere (healed students, say), `--ratios` with no value and `--no-unpruned` leave the
built-in variants out, `--only LABEL` keeps that one (to run one process per model side by side), `--resume`
skips the labels --out already holds (a run stopped at a deadline continues), no `--tasks` measures perplexity
alone.
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


def variants(args: argparse.Namespace) -> list[tuple[str, Path, ScoreOptions | None, bool]]:
    """(label, folder, scoring, novices): the unpruned model, one pruned checkpoint per ratio (and its novices
    variant, scored with --novice-criterion), then the --extra folders; scoring None = nothing to prune."""
    out = [] if args.no_unpruned else [("unpruned", Path(args.model), None, False)]
    for ratio in args.ratios:
        for novices in ([False, True] if args.novices else [False]):
            criterion = (args.novice_criterion or args.criterion) if novices else args.criterion
            label = f"{criterion} {ratio:g}" + (" novices" if novices else "")
            out.append((label, args.workdir / label.replace(" ", "-"), ScoreOptions(criterion, ratio=ratio), novices))
    for spec in args.extra:
        label, _, folder = spec.partition("=")
        out.append((label, Path(folder), None, False))
    return out


def done_labels(out: Path | None) -> set[str]:
    """Labels --out already holds (for --resume)."""
    if out is None or not out.is_file():
        return set()
    return {json.loads(line)["model"] for line in out.read_text().splitlines() if line.strip()}


def measure(label: str, folder: Path, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    options = EvalOptions(max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                          device=args.device, dtype="float32")
    result = evaluate_model(str(folder), (args.eval,) if args.eval else (), options,
                            tasks=TaskOptions(tasks=(str(args.tasks),) if args.tasks else (), limit=args.limit))
    row = {"model": label, "folder": str(folder), "geomean_ppl": result.get("geomean_ppl")}
    if "tasks" in result:
        runs = result["tasks"]["model"]
        acc = {t: e["metrics"]["acc"] for t, e in runs["results"].items()}
        acc_norm = {t: e["metrics"].get("acc_norm") for t, e in runs["results"].items()}
        row |= {"mean_acc": sum(acc.values()) / len(acc), "mean_acc_norm": sum(acc_norm.values()) / len(acc_norm),
                "acc": acc, "acc_norm": acc_norm, "items": {t: e["samples"] for t, e in runs["results"].items()},
                "timing": runs["timing"]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if "files" in result:
        row["ppl"] = {f["domain"]: f["ppl"] for f in result["files"]}
        row["ppl_tokens_per_file"] = max(f["tokens"] for f in result["files"])
    return row


def table(rows: list[dict]) -> str:
    tasks = next((list(r["acc"]) for r in rows if "acc" in r), [])
    head = ["model", "geomean ppl", "mean acc", "mean acc_norm", *[t.removeprefix("mc_") for t in tasks],
            "s / 1k req", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = f"{r['geomean_ppl']:.2f}" if r["geomean_ppl"] else "-"
        accs = ([f"{r['mean_acc']:.3f}", f"{r['mean_acc_norm']:.3f}", *[f"{r['acc'][t]:.3f}" for t in tasks],
                 f"{r['timing']['seconds_per_1000_requests']:.1f}"] if "acc" in r else ["-"] * (len(tasks) + 3))
        lines.append("| " + " | ".join([r["model"], ppl, *accs, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--stats", type=Path, help="statistics file (needed when --ratios is given)")
    p.add_argument("--criterion", default="recon")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    p.add_argument("--novices", action="store_true", help="also the MoNE-novice variant of each ratio")
    p.add_argument("--novice-criterion", help="criterion of the novice variants (default: --criterion)")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=FOLDER",
                   help="also evaluate this checkpoint under this label (repeatable)")
    p.add_argument("--no-unpruned", action="store_true", help="leave the unpruned row out")
    p.add_argument("--resume", action="store_true", help="skip the labels --out already holds")
    p.add_argument("--only", action="append", metavar="LABEL",
                   help="evaluate only the variants of this label (repeatable; one process per model in parallel)")
    p.add_argument("--tasks", type=Path, help="folder written by bench/mc_task.py; none: perplexity only")
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
    if args.ratios and args.stats is None:
        p.error("--ratios needs --stats")
    return args


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    done = done_labels(args.out) if args.resume else set()
    rows = []
    for label, folder, scoring, novices in variants(args):
        if label in done or (args.only and label not in args.only):
            continue
        if scoring is not None and not (folder / "pruning.json").is_file():
            prune(args.model, folder, scoring=scoring, stats_path=args.stats,
                  write=WriteOptions(overwrite=True, novices=novices), echo=lambda *a, **k: None)
        rows.append(measure(label, folder, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        if not args.keep and scoring is not None:
            shutil.rmtree(folder)
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
