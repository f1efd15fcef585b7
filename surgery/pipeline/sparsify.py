"""`sparsify`: optionally remove experts first (scores → plan → rewrite, into the output's temporary folder), then
zero the lowest-scoring weights inside every remaining expert (surgery.refine.sparsify)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.collect.options import CollectOptions
from surgery.errors import UserError
from surgery.io.derived import DerivedCheckpoint
from surgery.pipeline.score import ScoreOptions, score_plan

PRUNED = "pruned"  # the expert-removed checkpoint, inside the output's temporary folder while it is sparsified


@dataclass(frozen=True)
class SparsifyOptions:
    """`sparsity` per output row (N:M `pattern`s imply 1 - N/M), the weight score (`method`), whether
    shared experts are sparsified too, and `sequential`: score each layer on inputs that went through the
    sparsified layers below (a calibration pass, surgery.refine.sparsify.sequential, as sparsegpt always is)."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    method: str = "moe-pruner"
    include_shared: bool = False
    sequential: bool = False

    @property
    def calibrated(self) -> bool:
        """Statistics from calibration text (-d) rather than a statistics file."""
        return self.sequential or self.method == "sparsegpt"


def sparsify(model_dir: Path, out_dir: Path, stats_path: Path | None, options: SparsifyOptions, *,
             remove: ScoreOptions | None = None, overwrite: bool = False, data: tuple[str, ...] = (),
             calibration: CollectOptions = CollectOptions()) -> dict:
    """Write OUT_DIR; with `remove` (criterion + ratio), experts are removed first as `prune` does.
    Returns pruning.json's `sparsity` section. The output is opened (an existing one refused) first.
    --sequential and sparsegpt read `data` (`calibration`: how many sequences, their length, the device)."""
    from surgery.refine.sparsify import check_sparsity

    check_sparsity(options.sparsity, options.pattern)
    if remove is not None and (remove.ratio is None) != (remove.criterion is None):
        raise UserError("--ratio/--remove-ratio and --criterion go together (remove experts, then sparsify)")
    if options.calibrated != bool(data):
        raise UserError("--sequential and --method sparsegpt read calibration text: pass -d DATA" if options.calibrated
                        else "-d DATA goes with --sequential or --method sparsegpt (others read --stats)")
    if options.calibrated and stats_path is not None and (remove is None or remove.criterion is None):
        raise UserError("--sequential and --method sparsegpt take their statistics from -d DATA; --stats is read "
                        "only with --criterion (to remove experts first)")
    write = _writer(options, None if options.method == "magnitude" else stats_path, data, calibration)
    with DerivedCheckpoint(out_dir, overwrite=overwrite, inputs=[model_dir]) as out:
        if remove is None or remove.criterion is None:
            return write(model_dir, out)
        return _remove_then_sparsify(model_dir, stats_path, out, remove, write)


def _writer(options: SparsifyOptions, stats_path: Path | None, data: tuple[str, ...],
            calibration: CollectOptions) -> Callable[[Path, DerivedCheckpoint], dict]:
    """(source checkpoint, output) -> sparsity section: from the statistics file, or from a calibration pass."""
    if not options.calibrated:
        from surgery.refine.sparsify import sparsify_checkpoint

        def from_stats(src: Path, out: DerivedCheckpoint) -> dict:
            return sparsify_checkpoint(src, stats_path, out, sparsity=options.sparsity, pattern=options.pattern,
                                       method=options.method, include_shared=options.include_shared, progress=True)

        return from_stats
    if options.include_shared:
        raise UserError("--include-shared is not supported with --sequential or --method sparsegpt")
    from surgery.refine.sparsify.sequential import calibrated_sparsify

    def from_text(src: Path, out: DerivedCheckpoint) -> dict:
        return calibrated_sparsify(src, list(data), out, calibration=calibration, sequential=options.sequential,
                                   sparsity=options.sparsity, pattern=options.pattern, method=options.method)

    return from_text


def _remove_then_sparsify(model_dir: Path, stats_path: Path | None, out: DerivedCheckpoint, remove: ScoreOptions,
                          write: Callable[[Path, DerivedCheckpoint], dict]) -> dict:
    """Expert removal into a folder inside the output's temporary folder (same disk, removed with it on any
    failure), then sparsity into the output; the removed checkpoint is deleted before the output is committed.

    The removed checkpoint's pruning.json names the original model and the kept expert ids, which
    is how the statistics (collected on the original) are matched to the kept experts.
    """
    import shutil

    from surgery.rewrite.experts import rewrite_checkpoint

    plan = score_plan(model_dir, stats_path, remove)
    pruned = rewrite_checkpoint(model_dir, plan, out.tmp / PRUNED, progress=True)
    section = write(pruned, out)
    shutil.rmtree(pruned)
    return section
