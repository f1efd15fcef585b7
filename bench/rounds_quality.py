"""One-shot vs iterative (`--rounds N`) vs progressive (`--rounds N --progressive`) vs iterative with
healing between rounds (`--rounds N --heal-between local`) pruning: quality and wall time.

For each criterion and mode: collect (once, N times on the pruned-so-far checkpoint, or N times
with the layer blocks above pruned in memory), score, rewrite (and heal), then evaluate perplexity
and KL / top-1 agreement against the unpruned model. Wall time covers collect + score + rewrite (+ heal),
exactly what `moe-surgery prune -d DATA --rounds N [...]` runs.

  python bench/rounds_quality.py --model ../shared/fixtures/qwen3-moe-tiny --data ../shared/data/calib \
      --eval ../shared/data/eval --criteria recon gated_sq --ratio 0.5 --rounds 4 \
      --samples 64 --seq-len 512 --device cpu --out rounds.jsonl [--modes one-shot rounds rounds-heal]
      [--heal-between local lottery] [--heal-tokens N] [--heal-lr LR] [--heal-schedule constant|doubling]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import emit, list_eval_files  # noqa: E402
from quality import _flat  # noqa: E402

from surgery.collect.options import CollectOptions  # noqa: E402
from surgery.pipeline.prune import RoundsOptions, prune_rounds  # noqa: E402
from surgery.pipeline.score import ScoreOptions  # noqa: E402
from surgery.eval.perplexity import evaluate  # noqa: E402
from surgery.model.load import load_model, load_tokenizer  # noqa: E402

MODES = ("one-shot", "rounds", "progressive", "rounds-heal")


def schedules(names: list[str], rounds: int, heals: list[str]) -> list[tuple[str, int, bool, str | None]]:
    """(label, rounds, progressive, heal-between) of each compared schedule; rounds-heal once per heal mode."""
    table = {"one-shot": [("one-shot", 1, False, None)], "rounds": [(f"rounds {rounds}", rounds, False, None)],
             "progressive": [(f"progressive {rounds}", rounds, True, None)],
             "rounds-heal": [(f"rounds {rounds} + heal {h}", rounds, False, h) for h in heals]}
    return [row for n in names for row in table[n]]


def prune_one(args: argparse.Namespace, criterion: str, rounds: int, progressive: bool, heal: str | None,
              out: Path) -> float:
    """`prune -d DATA --criterion C --ratio R [--rounds N] [--progressive] [--heal-between H]` into `out`;
    returns the wall time in seconds."""
    collect = CollectOptions(samples=args.samples, seq_len=args.seq_len, holdout=0, batch_size=args.collect_batch_size,
                             device=args.device, dtype="float32", stream_layers=False)
    schedule = RoundsOptions(data=(args.data,), rounds=rounds if rounds > 1 else None, progressive=progressive,
                             heal_between=heal, heal_tokens=args.heal_tokens, heal_lr=args.heal_lr,
                             heal_schedule=args.heal_schedule, work_dir=Path(args.tmp or out.parent))
    start = time.perf_counter()
    prune_rounds(Path(args.model), out, ScoreOptions(criterion, ratio=args.ratio, seed=args.seed), schedule, collect)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    eval_files = list_eval_files(args.eval)
    tokenizer = load_tokenizer(args.model)
    reference = load_model(args.model, device=args.device, dtype=torch.float32)
    kw = dict(seq_len=512, max_tokens=args.max_tokens, batch_size=8, device=args.device, progress=False)
    base = evaluate(reference, tokenizer, eval_files, **kw)
    rows = [{"criterion": "unpruned", "mode": "", "ratio": 0.0, **_flat(base, base, None)}]
    emit(rows[-1], args.out)
    work = Path(tempfile.mkdtemp(prefix="rounds-quality-", dir=args.tmp))
    try:
        for criterion in args.criteria:
            for label, rounds, progressive, heal in schedules(args.modes, args.rounds, args.heal_between):
                out = work / f"{criterion}-{label.replace(' ', '').replace('+', '-')}"
                seconds = prune_one(args, criterion, rounds, progressive, heal, out)
                model = load_model(out, device=args.device, dtype=torch.float32)
                r = evaluate(model, tokenizer, eval_files, reference=reference, **kw)
                rows.append({"criterion": criterion, "mode": label, "ratio": args.ratio, **_flat(r, base, None),
                             "seconds": seconds, "keep": json.loads((out / "pruning.json").read_text())["expert_map"]})
                emit(rows[-1], args.out)
                del model
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["criterion", "mode", "removed", "geomean ppl", "Δ ppl", "KL", "top-1", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["criterion"], r["mode"], f"{r['ratio']:.0%}", f"{r['geomean_ppl']:.2f}", f"{r['delta']:+.1%}",
                 f"{r.get('kl', 0):.3f}", f"{r.get('top1', 1):.3f}", f"{r['seconds']:.0f}" if "seconds" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="Calibration text (file or folder).")
    ap.add_argument("--eval", required=True, help="Folder of eval .jsonl files.")
    ap.add_argument("--criteria", nargs="+", default=["recon", "gated_sq"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["one-shot", "rounds", "progressive"])
    ap.add_argument("--heal-between", nargs="+", default=["local"], choices=["local", "kd", "both", "lottery"],
                    help="For rounds-heal: one row per mode.")
    ap.add_argument("--heal-tokens", type=int, default=None,
                    help="For rounds-heal: round 1's calibration tokens (default: the mode's, as prune).")
    ap.add_argument("--heal-lr", type=float, default=None, help="For rounds-heal (default: the mode's, as prune).")
    ap.add_argument("--heal-schedule", choices=["constant", "doubling"], default=None,
                    help="For rounds-heal (default: the mode's, as prune).")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--collect-batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4096, help="Tokens per eval file.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="Append JSON lines here.")
    ap.add_argument("--tmp", default=None, help="Where checkpoints are written (deleted after each run).")
    args = ap.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
