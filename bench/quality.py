"""Quality table (issue 5): prune a real trained MoE with every criterion and measure it.

For each criterion and ratio: score from the statistics file, rewrite the checkpoint, and
evaluate perplexity per eval file, geometric mean, and KL / top-1 agreement against the
unpruned model. Writes JSON lines (one per run) and prints a Markdown table.

  python bench/quality.py --model ../shared/fixtures/qwen3-moe-tiny --stats stats.safetensors \
      --eval ../shared/data/eval --ratios 0.25 0.5 --out results.jsonl [--device cuda]

Collect the statistics first with `moe-surgery collect` (the command is recorded in RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from surgery.pipeline.score import ScoreOptions, score_plan
from surgery.criteria import CRITERIA
from surgery.eval.perplexity import evaluate
from surgery.model.load import load_model, load_tokenizer
from surgery.rewrite.experts import rewrite_checkpoint
from bench_common import emit, list_eval_files


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run(args: argparse.Namespace) -> list[dict]:
    eval_files = list_eval_files(args.eval)
    tokenizer = load_tokenizer(args.model)
    reference = load_model(args.model, device=args.device, dtype=torch.float32)
    kw = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
              progress=False)
    base = evaluate(reference, tokenizer, eval_files, **kw)
    rows = [{"criterion": "unpruned", "ratio": 0.0, **_flat(base, base, args.focus)}]
    emit(rows[-1], args.out)
    work = Path(tempfile.mkdtemp(prefix="quality-", dir=args.tmp))
    try:
        for ratio in args.ratios:
            for name in args.criteria:
                t0 = time.perf_counter()
                crit, _, drop = name.partition("@")  # NAME@low / NAME@high: the other drop direction
                plan = score_plan(Path(args.model), Path(args.stats),
                                  ScoreOptions(crit, ratio=ratio, seed=args.seed, drop=drop or None))
                out = work / f"{name.replace(':', '_')}-{ratio}"
                rewrite_checkpoint(args.model, plan, out)
                model = load_model(out, device=args.device, dtype=torch.float32)
                r = evaluate(model, tokenizer, eval_files, reference=reference, **kw)
                row = {"criterion": name, "ratio": ratio, **_flat(r, base, args.focus),
                       "seconds": time.perf_counter() - t0}
                if "auto" in plan.extra:
                    row["auto_winner"] = plan.extra["auto"]["winner"]
                    row["auto_errors"] = plan.extra["auto"]["errors"]
                rows.append(row)
                emit(row, args.out)
                del model
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _flat(r: dict, base: dict, focus: str | None) -> dict:
    ppl = {f["domain"]: f["ppl"] for f in r["files"]}
    out = {"geomean_ppl": r["geomean_ppl"], "delta": r["geomean_ppl"] / base["geomean_ppl"] - 1, "ppl": ppl}
    if "kl" in r:
        out.update(kl=r["kl"], top1=r["top1"])
    if focus:
        rest = [v for k, v in ppl.items() if k != focus]
        out.update(focus_ppl=ppl[focus], rest_geomean=geomean(rest))
    return out


def markdown(rows: list[dict], focus: str | None = None) -> str:
    """One table: rows = criteria, columns = ratio × (geomean ppl, Δ, KL, top-1)."""
    domains = list(rows[0]["ppl"])
    head = ["criterion", "removed", "geomean ppl", "Δ ppl", "KL", "top-1"]
    head += ["code ppl", "rest geomean"] if focus else domains
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["criterion"] + (f" → {r['auto_winner']}" if r.get("auto_winner") else ""), f"{r['ratio']:.0%}",
                 f"{r['geomean_ppl']:.2f}", f"{r['delta']:+.1%}", f"{r.get('kl', 0):.3f}", f"{r.get('top1', 1):.3f}"]
        cells += [f"{r['focus_ppl']:.2f}", f"{r['rest_geomean']:.2f}"] if focus else [f"{r['ppl'][d]:.2f}" for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--eval", required=True, help="Folder of eval .jsonl files (or one file).")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--criteria", nargs="+", help="Criterion names; NAME@low or NAME@high sets the drop direction", default=list(CRITERIA))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384, help="Tokens per eval file.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--focus", help="Domain reported apart (task-specific setting), e.g. code.")
    ap.add_argument("--out", type=Path, help="Append JSON lines here.")
    ap.add_argument("--tmp", default=None, help="Where pruned checkpoints are written (deleted after each run).")
    args = ap.parse_args()
    rows = run(args)
    print(markdown(rows, args.focus))


if __name__ == "__main__":
    main()
