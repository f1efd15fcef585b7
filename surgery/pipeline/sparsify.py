"""`sparsify`: optionally remove experts first (scores → plan → rewrite, into a temporary folder), then zero
the lowest-scoring weights inside every remaining expert (surgery.refine.sparsify)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError
from surgery.pipeline.score import ScoreOptions, plan_keep, score_plan


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
    Returns pruning.json's `sparsity` section."""
    from surgery.refine.sparsify import check_sparsity, sparsify_checkpoint

    check_sparsity(options.sparsity, options.pattern)
    if remove is not None and (remove.ratio is None) != (remove.criterion is None):
        raise UserError("--ratio/--remove-ratio and --criterion go together (remove experts, then sparsify)")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: output folder already exists (use --overwrite to replace it)")
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"{out_dir}: output folder must differ from the input checkpoint")
    kw = dict(sparsity=options.sparsity, pattern=options.pattern, method=options.method,
              include_shared=options.include_shared, overwrite=overwrite, progress=True)
    sparsity_stats = None if options.method == "magnitude" else stats_path
    if remove is None or remove.criterion is None:
        return sparsify_checkpoint(model_dir, sparsity_stats, out_dir, **kw)
    return _remove_then_sparsify(model_dir, stats_path, sparsity_stats, out_dir, remove, kw)


def _remove_then_sparsify(model_dir: Path, stats_path: Path | None, sparsity_stats: Path | None, out_dir: Path,
                          remove: ScoreOptions, kw: dict) -> dict:
    """Expert removal into a temporary folder beside OUT_DIR (same disk), then sparsity into OUT_DIR.

    The temporary checkpoint's pruning.json names the original model and the kept expert ids, which
    is how the statistics (collected on the original) are matched to the kept experts.
    """
    from surgery.refine.sparsify import sparsify_checkpoint
    from surgery.rewrite.experts import rewrite_checkpoint

    doc = score_plan(model_dir, stats_path, remove)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.pruned-", dir=out_dir.parent) as tmp:
        pruned = rewrite_checkpoint(model_dir, plan_keep(doc), Path(tmp) / "pruned", plan_doc=doc,
                                    plan_source=f"{remove.criterion} plan", progress=True)
        return sparsify_checkpoint(pruned, sparsity_stats, out_dir, **kw)
