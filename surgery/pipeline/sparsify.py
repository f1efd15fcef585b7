"""`sparsify`: optionally remove experts first (scores → plan → rewrite, into the output's temporary folder), then
zero the lowest-scoring weights inside every remaining expert (surgery.refine.sparsify)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError
from surgery.io.derived import DerivedCheckpoint
from surgery.pipeline.score import ScoreOptions, score_plan

PRUNED = "pruned"  # the expert-removed checkpoint, inside the output's temporary folder while it is sparsified


@dataclass(frozen=True)
class SparsifyOptions:
    """`sparsity` per output row (N:M `pattern`s imply 1 - N/M), the weight score (`method`), and whether
    shared experts are sparsified too."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    method: str = "moe-pruner"
    include_shared: bool = False


def sparsify(model_dir: Path, out_dir: Path, stats_path: Path | None, options: SparsifyOptions, *,
             remove: ScoreOptions | None = None, overwrite: bool = False) -> dict:
    """Write OUT_DIR; with `remove` (criterion + ratio), experts are removed first as `prune` does.
    Returns pruning.json's `sparsity` section. The output is opened (an existing one refused) first."""
    from surgery.refine.sparsify import check_sparsity, sparsify_checkpoint

    check_sparsity(options.sparsity, options.pattern)
    if remove is not None and (remove.ratio is None) != (remove.criterion is None):
        raise UserError("--ratio/--remove-ratio and --criterion go together (remove experts, then sparsify)")
    kw = dict(sparsity=options.sparsity, pattern=options.pattern, method=options.method,
              include_shared=options.include_shared, progress=True)
    sparsity_stats = None if options.method == "magnitude" else stats_path
    with DerivedCheckpoint(out_dir, overwrite=overwrite, inputs=[model_dir]) as out:
        if remove is None or remove.criterion is None:
            return sparsify_checkpoint(model_dir, sparsity_stats, out, **kw)
        return _remove_then_sparsify(model_dir, stats_path, sparsity_stats, out, remove, kw)


def _remove_then_sparsify(model_dir: Path, stats_path: Path | None, sparsity_stats: Path | None,
                          out: DerivedCheckpoint, remove: ScoreOptions, kw: dict) -> dict:
    """Expert removal into a folder inside the output's temporary folder (same disk, removed with it on any
    failure), then sparsity into the output; the removed checkpoint is deleted before the output is committed.

    The removed checkpoint's pruning.json names the original model and the kept expert ids, which
    is how the statistics (collected on the original) are matched to the kept experts.
    """
    import shutil

    from surgery.refine.sparsify import sparsify_checkpoint
    from surgery.rewrite.experts import rewrite_checkpoint

    plan = score_plan(model_dir, stats_path, remove)
    pruned = rewrite_checkpoint(model_dir, plan, out.tmp / PRUNED, progress=True)
    section = sparsify_checkpoint(pruned, sparsity_stats, out, **kw)
    shutil.rmtree(pruned)
    return section
