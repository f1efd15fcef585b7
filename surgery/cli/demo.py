"""`moe-surgery demo`: the whole pipeline on a small built-in model, offline (surgery.pipeline.demo)."""

from __future__ import annotations

from pathlib import Path

import click

from surgery.cli.options import overwrite_option, ratio_option


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("moe-surgery-demo"),
              show_default=True, help="Folder for the demo model, data, statistics and pruned checkpoints.")
@ratio_option(0.5)
@click.option("--steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Training steps of the built-in model.")
@overwrite_option
def demo(workdir: Path, ratio: float, steps: int, overwrite: bool) -> None:
    """Build a small Qwen3-MoE (trained briefly on generated text), collect statistics, prune it
    with several criteria, and compare perplexity and KL against the unpruned model.

    An existing --workdir is refused unless --overwrite (which replaces only a folder holding
    an earlier demo's files); options are checked before any work."""
    from surgery.pipeline.demo import check_demo, run_demo

    check_demo(workdir, ratio, steps, overwrite)
    run_demo(workdir, ratio, steps, echo=click.echo, overwrite=overwrite)
