"""`moe-surgery sparsify`: zero the least important weights inside every expert (surgery.pipeline.sparsify)."""

from __future__ import annotations

from pathlib import Path

import click

from surgery.cli.options import (
    RenamedOptions, criterion_option, option_group, output_option, overwrite_option, ratio_option, stats_option,
)
from surgery.pipeline.score import ScoreOptions
from surgery.pipeline.sparsify import SparsifyOptions, sparsify as run_sparsify
from surgery.refine.sparsify import METHODS

sparsify_options = option_group(
    "options", SparsifyOptions,
    click.option("--sparsity", type=float,
                 help="Fraction of weights zeroed in every output row of every expert matrix (N:M implies 1 - N/M)."),
    click.option("--pattern", default="unstructured", show_default=True,
                 help="unstructured, or N:M (2:4, 4:8): at most N non-zeros in every M consecutive inputs of a row."),
    click.option("--method", type=click.Choice(METHODS), default="moe-pruner", show_default=True,
                 help="Score |W| × router-weighted input norm (moe-pruner), × plain input norm (wanda), "
                      "or |W| (magnitude)."),
    click.option("--include-shared", is_flag=True,
                 help="Also sparsify shared experts (gate/up scored with the plain input norm, down by magnitude)."),
)


def _removal(ratio: float | None, criterion: str | None) -> ScoreOptions:
    return ScoreOptions(criterion, ratio=ratio)


@click.command(cls=RenamedOptions, renamed={"--remove-ratio": "--ratio"})
@click.argument("model_dir", type=click.Path(path_type=Path))
@output_option()
@stats_option
@sparsify_options
@option_group("remove", _removal, ratio_option(), criterion_option())
@overwrite_option
def sparsify(model_dir: Path, output: Path, stats_path: Path | None, options: SparsifyOptions, remove: ScoreOptions,
             overwrite: bool) -> None:
    """Write a copy of MODEL_DIR whose routed-expert matrices have the lowest-scoring weights of
    every output row set to zero (MoE-Pruner; Wanda without the router weighting).

    Streams one expert matrix at a time; attention, routers, norms and (unless --include-shared)
    shared experts are copied byte for byte, and kept weights keep their exact bits. Only MoE
    layers present in the statistics file are sparsified (all of them for magnitude). With
    --ratio and --criterion (--remove-ratio is the earlier name of --ratio), experts are removed
    first (as `prune` does, into OUTPUT's temporary folder) and the statistics of the kept
    experts are used for the sparsity.
    """
    section = run_sparsify(model_dir, output, stats_path, options, remove=remove, overwrite=overwrite)
    click.echo(f"Wrote {output}: {section['achieved']:.1%} of the weights in {len(section['tensors'])} expert tensors "
               f"({len(section['layers'])} MoE layers) are now zero ({options.method}, {options.pattern}).")
