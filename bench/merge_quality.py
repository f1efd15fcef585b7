"""Issue 23: drop vs merge (hc-smoe, mc-smoe, lsq), each with and without --refit, on a real trained MoE.

For each ratio, criterion and variant: `moe-surgery prune` (run as a subprocess under /usr/bin/time, so
its wall time and peak RSS are the command's own), then the quality table's evaluation (perplexity per
eval file, geometric mean, KL / top-1 against the unpruned model). Writes JSON lines and prints Markdown.

  python bench/merge_quality.py --model ../shared/fixtures/qwen3-moe-tiny --stats stats.safetensors \
      --eval ../shared/data/eval --calib-text ../shared/data/calib --ratios 0.25 0.5 --criteria gated_sq \
      --variants drop lsq hc-smoe mc-smoe drop+refit lsq+refit --max-tokens 4096 --out merge.jsonl

Collect the statistics with `moe-surgery collect ... --merge-stats` (hc-smoe and mc-smoe need them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from surgery.eval.perplexity import evaluate
from surgery.model.load import load_model, load_tokenizer
from bench_common import emit, list_eval_files
from quality import _flat

REPO = Path(__file__).resolve().parent.parent


def prune_command(args: argparse.Namespace, criterion: str, ratio: float, variant: str, out: Path) -> list[str]:
    method, _, refit = variant.partition("+")
    cmd = [sys.executable, "-m", "surgery.cli", "prune", args.model, "--stats", args.stats, "--criterion", criterion,
           "--ratio", str(ratio), "-o", str(out), "--overwrite", "--device", args.device]
    if method == "novices":
        cmd += ["--novices"]
    elif method not in ("drop", "auto"):
        cmd += ["--merge", method]
    if refit:
        cmd += ["--refit", "--refit-tokens", str(args.refit_tokens), "--refit-steps", str(args.refit_steps)]
    elif criterion == "auto":
        cmd += ["--no-refit"]
    if refit or criterion == "auto":
        cmd += [x for d in args.calib_text for x in ("--calib-text", d)]
    return cmd


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of a command, from /usr/bin/time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, int(re.findall(r"MAXRSS (\d+)", done.stderr)[-1])


def run(args: argparse.Namespace) -> list[dict]:
    eval_files = list_eval_files(args.eval)
    tokenizer = load_tokenizer(args.model)
    reference = load_model(args.model, device=args.device, dtype=torch.float32)
    kw = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
              progress=False)
    base = evaluate(reference, tokenizer, eval_files, **kw)
    rows = [{"criterion": "unpruned", "variant": "", "ratio": 0.0, **_flat(base, base, None)}]
    emit(rows[-1], args.out)
    work = Path(tempfile.mkdtemp(prefix="merge-quality-", dir=args.tmp))
    try:
        for ratio in args.ratios:
            for criterion in args.criteria:
                for variant in args.variants:
                    out = work / f"{criterion}-{variant}-{ratio}"
                    wall, rss = timed(prune_command(args, criterion, ratio, variant, out))
                    model = load_model(out, device=args.device, dtype=torch.float32)
                    r = evaluate(model, tokenizer, eval_files, reference=reference, **kw)
                    row = {"criterion": criterion, "variant": variant, "ratio": ratio, **_flat(r, base, None),
                           "prune_seconds": round(wall, 1), "prune_peak_rss_mib": round(rss / 1024)}
                    auto = json.loads((out / "pruning.json").read_text())["plan"].get("auto")
                    if auto:
                        row["auto"] = auto
                    rows.append(row)
                    emit(row, args.out)
                    del model
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| criterion | variant | removed | geomean ppl | Δ ppl | KL | top-1 | prune wall s | prune peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['variant']} | {r['ratio']:.0%} | {r['geomean_ppl']:.2f} | "
                     f"{r['delta']:+.1%} | {r.get('kl', 0):.3f} | {r.get('top1', 1):.3f} | "
                     f"{r.get('prune_seconds', '')} | {r.get('prune_peak_rss_mib', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--eval", required=True, help="Folder of eval .jsonl files (or one file).")
    ap.add_argument("--calib-text", nargs="+", default=[],
                    help="Calibration text for the +refit variants and for criterion auto (ranked by held-out loss).")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--criteria", nargs="+", default=["gated_sq"])
    ap.add_argument("--variants", nargs="+", default=["drop", "lsq", "hc-smoe", "mc-smoe"],
                    help="drop, novices, hc-smoe, mc-smoe or lsq, each optionally +refit; with criterion auto, `auto` lets it "
                         "choose")
    ap.add_argument("--refit-tokens", type=int, default=65536)
    ap.add_argument("--refit-steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096, help="Tokens per eval file.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="Append JSON lines here.")
    ap.add_argument("--tmp", default=None, help="Where pruned checkpoints are written (deleted after each run).")
    args = ap.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
