"""`moe-surgery demo`: the whole pipeline on a small built-in model, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

DEMO_CRITERIA = ("frequency", "soft_frequency", "reap", "man", "recon", "auto", "random")


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("moe-surgery-demo"),
              show_default=True, help="Folder for the demo model, data, statistics and pruned checkpoints.")
@click.option("--ratio", default=0.5, show_default=True, help="Fraction of experts removed.")
@click.option("--steps", default=300, show_default=True, help="Training steps of the built-in model.")
def demo(workdir: Path, ratio: float, steps: int) -> None:
    """Build a small Qwen3-MoE (trained briefly on generated text), collect statistics, prune it
    with several criteria, and compare perplexity and KL against the unpruned model."""
    from surgery.collect.run import collect
    from surgery.cli import _score
    from surgery.pipeline.demo import build_demo_model, make_corpus
    from surgery.eval.perplexity import evaluate
    from surgery.model.load import load_model, load_tokenizer
    from surgery.rewrite.experts import rewrite_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a dozen small loads: their bars would bury the table

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    calib, held = workdir / "calib.jsonl", workdir / "eval.jsonl"
    make_corpus(calib, 400, seed=1)
    make_corpus(held, 60, seed=2)
    click.echo(f"[1/4] Building and training the demo model ({steps} steps) in {workdir / 'model'}")
    model_dir = build_demo_model(workdir / "model", calib, steps=steps)
    click.echo("[2/4] Collecting statistics")
    stats = workdir / "stats.safetensors"
    summary = collect(model_dir, [str(calib)], stats, samples=96, seq_len=64, batch_size=16, holdout=32,
                      device="cpu", dtype="float32", progress=False)
    for line in summary.lines():
        click.echo("      " + line)
    reference = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    base = evaluate(reference, tokenizer, [str(held)], seq_len=64, max_tokens=4096, progress=False)
    click.echo(f"[3/4] Pruning {ratio:.0%} of the experts with {len(DEMO_CRITERIA)} criteria; [4/4] evaluating")
    click.echo(f"      {'criterion':<15} {'ppl':>8} {'Δppl':>8} {'KL':>8} {'top-1':>6}")
    click.echo(f"      {'(unpruned)':<15} {base['geomean_ppl']:>8.3f}")
    for name in DEMO_CRITERIA:
        doc = _score(model_dir, stats, name, ratio, None, False, 0, None)
        out = workdir / f"pruned-{name}"
        rewrite_checkpoint(model_dir, {int(k): v for k, v in doc["keep"].items()}, out, plan_doc=doc, overwrite=True)
        r = evaluate(load_model(out), tokenizer, [str(held)], seq_len=64, max_tokens=4096, reference=reference,
                     progress=False)
        note = f"  (auto chose {doc['auto']['winner']})" if "auto" in doc else ""
        click.echo(f"      {name:<15} {r['geomean_ppl']:>8.3f} {r['geomean_ppl'] / base['geomean_ppl'] - 1:>+8.1%} "
                   f"{r['kl']:>8.4f} {r['top1']:>6.3f}{note}")
    click.echo(f"Pruned checkpoints are in {workdir}/pruned-*; try `moe-surgery verify {workdir}/pruned-reap`.")
