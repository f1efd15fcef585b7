"""`moe-surgery sparsify`: zero the least important weights inside every expert (MoE-Pruner, Wanda, magnitude)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from surgery.errors import UserError
from surgery.refine.sparsify import METHODS, check_sparsity, sparsify_checkpoint


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New checkpoint folder.")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics file from `collect` (moe-pruner and wanda; also for --criterion).")
@click.option("--sparsity", type=float,
              help="Fraction of weights zeroed in every output row of every expert matrix (N:M implies 1 - N/M).")
@click.option("--pattern", default="unstructured", show_default=True,
              help="unstructured, or N:M (2:4, 4:8): at most N non-zeros in every M consecutive inputs of a row.")
@click.option("--method", type=click.Choice(METHODS), default="moe-pruner", show_default=True,
              help="Score |W| × router-weighted input norm (moe-pruner), × plain input norm (wanda), "
                   "or |W| (magnitude).")
@click.option("--include-shared", is_flag=True,
              help="Also sparsify shared experts (gate/up scored with the plain input norm, down by magnitude).")
@click.option("--remove-ratio", type=float,
              help="First remove this fraction of experts per MoE layer (with --criterion).")
@click.option("--criterion", help="Expert-removal criterion for --remove-ratio (see `moe-surgery criteria`).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def sparsify(model_dir: Path, out_dir: Path, stats_path: Path | None, sparsity: float | None, pattern: str,
             method: str, include_shared: bool, remove_ratio: float | None, criterion: str | None,
             overwrite: bool) -> None:
    """Write a copy of MODEL_DIR whose routed-expert matrices have the lowest-scoring weights of
    every output row set to zero (MoE-Pruner; Wanda without the router weighting).

    Streams one expert matrix at a time; attention, routers, norms and (unless --include-shared)
    shared experts are copied byte for byte, and kept weights keep their exact bits. Only MoE
    layers present in the statistics file are sparsified (all of them for magnitude). With
    --remove-ratio and --criterion, experts are removed first (as `prune` does, into a temporary
    folder beside OUT_DIR) and the statistics of the kept experts are used for the sparsity.
    """
    check_sparsity(sparsity, pattern)
    if (remove_ratio is None) != (criterion is None):
        raise UserError("--remove-ratio and --criterion go together (remove experts, then sparsify)")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: output folder already exists (use --overwrite to replace it)")
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"{out_dir}: output folder must differ from the input checkpoint")
    options = dict(sparsity=sparsity, pattern=pattern, method=method, include_shared=include_shared,
                   overwrite=overwrite, progress=True)
    sparsity_stats = None if method == "magnitude" else stats_path
    if remove_ratio is None:
        section = sparsify_checkpoint(model_dir, sparsity_stats, out_dir, **options)
    else:
        section = _remove_then_sparsify(model_dir, stats_path, sparsity_stats, out_dir, remove_ratio, criterion,
                                        options)
    click.echo(f"Wrote {out_dir}: {section['achieved']:.1%} of the weights in {len(section['tensors'])} expert tensors "
               f"({len(section['layers'])} MoE layers) are now zero ({method}, {pattern}).")


def _remove_then_sparsify(model_dir: Path, stats_path: Path | None, sparsity_stats: Path | None, out_dir: Path,
                          remove_ratio: float, criterion: str, options: dict) -> dict:
    """Expert removal into a temporary folder beside OUT_DIR (same disk), then sparsity into OUT_DIR.

    The temporary checkpoint's pruning.json names the original model and the kept expert ids, which
    is how the statistics (collected on the original) are matched to the kept experts.
    """
    from surgery.cli import _score
    from surgery.rewrite.experts import rewrite_checkpoint

    doc = _score(model_dir, stats_path, criterion, remove_ratio, None, False, 0, None)
    keep = {int(layer): ids for layer, ids in doc["keep"].items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.pruned-", dir=out_dir.parent) as tmp:
        pruned = rewrite_checkpoint(model_dir, keep, Path(tmp) / "pruned", plan_doc=doc,
                                    plan_source=f"{criterion} plan", progress=True)
        return sparsify_checkpoint(pruned, sparsity_stats, out_dir, **options)
