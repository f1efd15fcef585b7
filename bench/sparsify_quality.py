"""Quality of weight sparsity inside experts: magnitude vs Wanda vs MoE-Pruner, unstructured and N:M.

For each pattern and method: sparsify the checkpoint, then evaluate perplexity per eval file,
the geometric mean, and KL / top-1 agreement against the dense model. The paper's claim to
check is moe-pruner < wanda < magnitude in perplexity. Writes JSON lines (one per run) and
prints a Markdown table.

  python bench/sparsify_quality.py --model ../shared/fixtures/qwen3-moe-tiny --stats stats.safetensors \
      --eval ../shared/data/eval [--patterns unstructured 2:4] [--out results.jsonl] \
      [--methods moe-pruner moe-pruner@sequential sparsegpt@oneshot sparsegpt@sequential --data ../shared/data/calib]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from surgery.eval.perplexity import evaluate
from surgery.model.load import load_model, load_tokenizer
from surgery.collect.options import CollectOptions
from surgery.refine.sparsify import METHODS, sparsify_checkpoint
from surgery.refine.sparsify.sequential import CALIBRATED_METHODS, calibrated_sparsify
from bench_common import emit, list_eval_files


def run(args: argparse.Namespace) -> list[dict]:
    eval_files = list_eval_files(args.eval)
    tokenizer = load_tokenizer(args.model)
    reference = load_model(args.model, device=args.device, dtype=torch.float32)
    kw = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size, device=args.device,
              progress=False)
    base = evaluate(reference, tokenizer, eval_files, **kw)
    rows = [{"pattern": "dense", "method": "-", "achieved": 0.0, **_flat(base, base)}]
    emit(rows[-1], args.out)
    work = Path(tempfile.mkdtemp(prefix="sparsify-quality-", dir=args.tmp))
    try:
        for pattern in args.patterns:
            for method in args.methods:
                t0 = time.perf_counter()
                out = work / f"{method}-{pattern.replace(':', 'of')}"
                section = _sparsify(args, method, pattern, out)
                model = load_model(out, device=args.device, dtype=torch.float32)
                r = evaluate(model, tokenizer, eval_files, reference=reference, **kw)
                rows.append({"pattern": pattern, "method": method, "achieved": section["achieved"],
                             **_flat(r, base), "seconds": time.perf_counter() - t0})
                emit(rows[-1], args.out)
                del model
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _sparsify(args: argparse.Namespace, method: str, pattern: str, out: Path) -> dict:
    """METHOD from --stats, or METHOD@oneshot / METHOD@sequential from a calibration pass over --data
    (`sparsify -d DATA [--sequential]`, --samples x --calib-seq-len tokens)."""
    sparsity = args.sparsity if pattern == "unstructured" else None
    name, _, mode = method.partition("@")
    if not mode:
        return sparsify_checkpoint(args.model, None if name == "magnitude" else args.stats, out, sparsity=sparsity,
                                   pattern=pattern, method=name)
    calibration = CollectOptions(samples=args.samples, seq_len=args.calib_seq_len, batch_size=8, device=args.device,
                                 dtype="float32", progress=False)
    return calibrated_sparsify(args.model, [args.data], out, calibration=calibration, sequential=mode == "sequential",
                               sparsity=sparsity, pattern=pattern, method=name)


def _flat(r: dict, base: dict) -> dict:
    out = {"geomean_ppl": r["geomean_ppl"], "delta": r["geomean_ppl"] / base["geomean_ppl"] - 1,
           "ppl": {f["domain"]: f["ppl"] for f in r["files"]}}
    if "kl" in r:
        out.update(kl=r["kl"], top1=r["top1"])
    return out


def markdown(rows: list[dict]) -> str:
    """One row per (pattern, method): achieved sparsity, geomean ppl, Δ, KL, top-1, then ppl per domain."""
    domains = list(rows[0]["ppl"])
    head = ["pattern", "method", "zeros", "geomean ppl", "Δ ppl", "KL", "top-1", *domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pattern"], r["method"], f"{r['achieved']:.1%}", f"{r['geomean_ppl']:.3f}", f"{r['delta']:+.1%}",
                 f"{r.get('kl', 0):.4f}", f"{r.get('top1', 1):.3f}", *(f"{r['ppl'][d]:.3f}" for d in domains)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--stats", required=True, help="Statistics file collected on --model.")
    ap.add_argument("--eval", required=True, help="Folder of eval .jsonl files (or one file).")
    ap.add_argument("--sparsity", type=float, default=0.5, help="Unstructured sparsity (N:M implies its own).")
    ap.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "moe-pruner"],
                    choices=[*METHODS, *(f"{m}@{mode}" for m in CALIBRATED_METHODS for mode in ("oneshot", "sequential"))],
                    help="METHOD reads --stats; METHOD@oneshot and METHOD@sequential run -d --data's calibration pass.")
    ap.add_argument("--data", help="Calibration text for the @oneshot / @sequential methods.")
    ap.add_argument("--samples", type=int, default=64, help="Calibration sequences for the @ methods.")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="Their length.")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192, help="Tokens per eval file.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="Append JSON lines here.")
    ap.add_argument("--tmp", default=None, help="Where sparsified checkpoints are written (deleted after each run).")
    args = ap.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
