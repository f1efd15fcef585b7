"""`moe-surgery sparsify`: zero the least important weights inside every expert (surgery.pipeline.sparsify)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from surgery.cli.options import (
    RenamedOptions, calibration_options, criterion_option, data_option, option_group, output_option, overwrite_option,
    ratio_option, seed_option, stats_option,
)
from surgery.collect.options import CollectOptions
from surgery.pipeline.score import ScoreOptions
from surgery.pipeline.sparsify import SparsifyOptions, sparsify as run_sparsify
from surgery.refine.sparsify import METHODS

sparsify_options = option_group(
    "options", SparsifyOptions,
    click.option("--sparsity", type=float,
                 help="Fraction of weights zeroed in every output row of every expert matrix; required unless "
                      "--pattern is N:M (which implies 1 - N/M)."),
    click.option("--pattern", default="unstructured", show_default=True,
                 help="unstructured, or N:M (2:4, 4:8): at most N non-zeros in every M consecutive inputs of a row."),
    click.option("--method", type=click.Choice([*METHODS, "sparsegpt"]), default="moe-pruner", show_default=True,
                 help="Score |W| × router-weighted input norm (moe-pruner), × plain input norm (wanda), "
                      "or |W| (magnitude); or sparsegpt: SparseGPT's OBS updates from each expert's routed input "
                      "Hessian (needs -d DATA; the kept weights change)."),
    click.option("--include-shared", is_flag=True,
                 help="Also sparsify shared experts (gate/up scored with the plain input norm, down by magnitude)."),
    click.option("--sequential", is_flag=True,
                 help="MoE-Pruner's layer-wise procedure: run -d DATA through the model one layer at a time, each "
                      "layer scored on inputs that already went through the sparsified layers below it, instead "
                      "of reading --stats (moe-pruner, wanda, sparsegpt)."),
)


def _removal(ratio: float | None, criterion: str | None) -> ScoreOptions:
    return ScoreOptions(criterion, ratio=ratio)


@click.command(cls=RenamedOptions, renamed={"--remove-ratio": "--ratio"})
@click.argument("model_dir", type=click.Path(path_type=Path))
@output_option()
@stats_option
@sparsify_options
@option_group("remove", _removal, ratio_option(), criterion_option())
@data_option(required=False)
@calibration_options
@seed_option
@overwrite_option
def sparsify(model_dir: Path, output: Path, stats_path: Path | None, options: SparsifyOptions, remove: ScoreOptions,
             data: tuple[str, ...], collecting: CollectOptions, seed: int, overwrite: bool) -> None:
    """Write a copy of MODEL_DIR whose routed-expert matrices have the lowest-scoring weights of
    every output row set to zero (MoE-Pruner; Wanda without the router weighting).

    Streams one expert matrix at a time; attention, routers, norms and (unless --include-shared)
    shared experts are copied byte for byte, and kept weights keep their exact bits. Only MoE
    layers present in the statistics file are sparsified (all of them for magnitude). With
    --ratio and --criterion (--remove-ratio is the earlier name of --ratio), experts are removed
    first (as `prune` does, into OUTPUT's temporary folder) and the statistics of the kept
    experts are used for the sparsity. With --sequential or --method sparsegpt the statistics come
    from -d DATA instead (--samples sequences of --seq-len, on --device), one layer at a time.
    """
    section = run_sparsify(model_dir, output, stats_path, options, remove=remove, overwrite=overwrite, data=data,
                           calibration=replace(collecting, seed=seed))
    click.echo(f"Wrote {output}: {section['achieved']:.1%} of the weights in {len(section['tensors'])} expert tensors "
               f"({len(section['layers'])} MoE layers) are now zero ({options.method}, {options.pattern}).")
