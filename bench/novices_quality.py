"""Novices vs plain removal (MoNE issue): do mean-output constants recover part of the pruning loss?

For each fixture, ratio and criterion: score once from the statistics file, write the checkpoint twice
(experts removed; experts replaced by novices, `surgery.rewrite.novices`), evaluate both in float32 on CPU
(perplexity per eval domain, KL and top-1 against the unpruned model) and print a Markdown table.

  python bench/novices_quality.py --model ../shared/fixtures/qwen3-moe-tiny \
      --stats /tmp/novice-stats-qwen3-moe-tiny.safetensors --eval ../shared/data/eval \
      --ratios 0.25 0.5 --criteria mone reap --out novices.jsonl

Statistics: `moe-surgery collect MODEL -d ../shared/data/calib -o STATS --samples 64 --seq-len 512 --holdout 0`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from stats_formats import StatsFile
from surgery.pipeline.score import ScoreOptions, score_plan
from surgery.eval.perplexity import evaluate
from surgery.model.load import load_model, load_tokenizer
from surgery.rewrite.novices import write_novice_checkpoint
from surgery.rewrite.experts import rewrite_checkpoint
from bench_common import emit, list_eval_files


def run(args: argparse.Namespace) -> list[dict]:
    eval_files = list_eval_files(args.eval)
    model_dir, stats = Path(args.model), StatsFile(args.stats)
    tokenizer = load_tokenizer(model_dir)
    reference = CachedLogits(load_model(model_dir, dtype=torch.float32))
    kw = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, progress=False)
    rows = [_row(model_dir.name, "unpruned", 0.0, "-", evaluate(reference, tokenizer, eval_files, **kw))]
    emit(rows[-1], args.out)
    work = Path(tempfile.mkdtemp(prefix="novices-quality-"))
    try:
        for ratio in args.ratios:
            for criterion in args.criteria:
                plan = score_plan(model_dir, Path(args.stats), ScoreOptions(criterion, ratio=ratio))
                for variant in ("removed", "novices"):
                    out = work / f"{criterion}-{ratio}-{variant}"
                    if variant == "novices":
                        write_novice_checkpoint(model_dir, plan, stats, out)
                    else:
                        rewrite_checkpoint(model_dir, plan, out)
                    model = load_model(out, dtype=torch.float32)
                    result = evaluate(model, tokenizer, eval_files, reference=reference, **kw)
                    rows.append(_row(model_dir.name, criterion, ratio, variant, result))
                    emit(rows[-1], args.out)
                    del model
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


class CachedLogits:
    """The unpruned model, computing each batch's logits once: every evaluation sees the same windows,
    so the reference pass is paid once per fixture instead of once per run (two CPU cores)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.cache: dict[bytes, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        key = input_ids.numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids, **kwargs).logits
        return SimpleNamespace(logits=self.cache[key])


def _row(fixture: str, criterion: str, ratio: float, variant: str, r: dict) -> dict:
    row = {"fixture": fixture, "criterion": criterion, "ratio": ratio, "variant": variant,
           "geomean_ppl": r["geomean_ppl"], "ppl": {f["domain"]: f["ppl"] for f in r["files"]}}
    if "kl" in r:
        row.update(kl=r["kl"], top1=r["top1"])
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one row per run, perplexity per domain, then geomean, KL, top-1 and the share of the
    removal's log-perplexity loss that novices win back (same fixture, criterion and ratio)."""
    domains = list(rows[0]["ppl"])
    base = {r["fixture"]: r for r in rows if r["criterion"] == "unpruned"}
    removed = {(r["fixture"], r["criterion"], r["ratio"]): r for r in rows if r["variant"] == "removed"}
    head = ["fixture", "criterion", "ratio", "variant", *domains, "geomean", "KL", "top1", "recovered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        recovered = ""
        plain = removed.get((r["fixture"], r["criterion"], r["ratio"]))
        if r["variant"] == "novices" and plain:
            b = math.log(base[r["fixture"]]["geomean_ppl"])
            loss = math.log(plain["geomean_ppl"]) - b
            recovered = f"{(math.log(plain['geomean_ppl']) - math.log(r['geomean_ppl'])) / loss:.0%}" if loss else ""
        cells = [r["fixture"], r["criterion"], f"{r['ratio']:g}", r["variant"], *(f"{r['ppl'][d]:.2f}" for d in domains),
                 f"{r['geomean_ppl']:.2f}", f"{r['kl']:.4f}" if "kl" in r else "-",
                 f"{r['top1']:.3f}" if "top1" in r else "-", recovered]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--stats")
    p.add_argument("--eval", default="../shared/data/eval")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--criteria", nargs="+", default=["mone", "reap"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, help="Append JSON lines here.")
    p.add_argument("--table", type=Path, nargs="+", help="Only print the Markdown table of these JSON-lines files.")
    args = p.parse_args()
    if args.table:
        print(table([json.loads(line) for f in args.table for line in f.read_text().splitlines() if line]))
        return
    if not (args.model and args.stats):
        p.error("--model and --stats are required (unless --table)")
    print(table(run(args)))


if __name__ == "__main__":
    main()
