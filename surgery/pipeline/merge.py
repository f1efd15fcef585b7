"""`prune --merge METHOD` and `prune --refit`: merge the experts a plan removes into the kept ones, and/or
refit the pruned blocks to the original's with heal's layer-local stage (surgery.refine.merge)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError
from surgery.plan import Plan

METHODS = ("hc-smoe", "mc-smoe", "lsq")  # surgery.rewrite.merge.METHODS (no numpy import for the CLI)
# The refit's sequence length unless --seq-len is given: on qwen3-moe-tiny at the default budget, 512-token
# sequences fitted better than 2048-token ones (+11.0% / +37.9% against +11.9% / +40.7% at 25% / 50% removed,
# bench/RESULTS.md, issue 23): the same tokens then come from four times as many documents.
REFIT_SEQ_LEN = 512


@dataclass(frozen=True)
class MergeOptions:
    """`merge`: None (drop), hc-smoe, mc-smoe or lsq (surgery.rewrite.merge). `refit`: run heal's layer-local
    stage on `text` (`refit_tokens` tokens in sequences of `seq_len`, `refit_steps` steps per layer) before
    writing; None (not said) means on when `text` is given, because the refit won on every measured model and
    ratio (bench/RESULTS.md, issue 23). `text` also makes `--criterion auto` rank candidate plans by their
    held-out loss on it (surgery.pipeline.auto_loss)."""

    merge: str | None = None
    refit: bool | None = None
    text: tuple[str, ...] = ()
    refit_tokens: int = 262144
    refit_steps: int = 600
    seq_len: int = REFIT_SEQ_LEN

    @property
    def refitting(self) -> bool:
        return self.refit if self.refit is not None else bool(self.text)

    @property
    def active(self) -> bool:
        return self.merge is not None or self.refitting


def check_merge_request(merging: MergeOptions, stats_path: Path | None, novices: bool, collecting: bool,
                        criterion: str | None = None) -> None:
    """Refuse combinations that cannot work, before anything is written."""
    if merging.text and merging.refit is False and criterion != "auto":
        raise UserError("--calib-text is for the refit and --criterion auto: with --no-refit it would go unused")
    if not merging.active:
        return
    if collecting:
        raise UserError("--merge / --refit (on with --calib-text) work on one plan from --stats or --plan: drop "
                        "-d/--rounds")
    if novices and criterion == "auto" and merging.text:
        raise UserError("--criterion auto with --calib-text chooses between dropping and merging; with --novices "
                        "give a criterion")
    if novices and merging.merge is not None:
        raise UserError("--novices keeps the removed experts as constants, --merge folds them into the kept ones: "
                        "choose one")
    if merging.merge is not None and stats_path is None:
        raise UserError("--merge needs --stats (the merge weights and groups come from the statistics file)")
    if merging.refitting and not merging.text:
        raise UserError("--refit needs calibration text: give --calib-text PATH")


@contextlib.contextmanager
def _work_folder(out) -> Iterator[Path]:
    """Intermediate checkpoints inside the output's temporary folder (its cleanup covers them), removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.tmp.resolve()))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_merge_or_refit(model_dir: Path, plan: Plan, out_dir: Path, stats_path: Path | None, merging: MergeOptions,
                         *, overwrite: bool = False, allow_nonuniform: bool = False, hash_shards: bool = False,
                         device: str | None = None, seed: int = 0, progress: bool = True,
                         novices: bool = False) -> None:
    """Write OUT_DIR: the plan's experts dropped, merged (`merging.merge`) or kept as MoNE novices (`novices`),
    then refitted (`merging.refitting`)."""
    from surgery.io.derived import DerivedCheckpoint, as_output
    from surgery.refine.merge import RefitOptions, refit, write_merged
    from surgery.rewrite.experts import rewrite_checkpoint

    out = as_output(out_dir, overwrite, [model_dir])
    with out, _work_folder(out) as work:
        if not merging.refitting:
            from stats_formats import StatsFile

            write_merged(model_dir, plan, merging.merge, StatsFile(stats_path), out, work,
                         allow_nonuniform=allow_nonuniform, progress=progress, hash_shards=hash_shards)
            return
        student = work / "pruned"
        if novices:
            from stats_formats import StatsFile
            from surgery.io.identity import check_stats_match
            from surgery.rewrite.novices import write_novice_checkpoint

            stats = StatsFile(stats_path)
            check_stats_match(model_dir, stats)
            write_novice_checkpoint(model_dir, plan, stats, student, progress=progress, hash_shards=hash_shards)
        elif merging.merge is None:
            rewrite_checkpoint(model_dir, plan, student, allow_nonuniform=allow_nonuniform, progress=progress,
                               hash_shards=hash_shards)
        else:
            from stats_formats import StatsFile

            with DerivedCheckpoint(student) as merged:
                write_merged(model_dir, plan, merging.merge, StatsFile(stats_path), merged, work,
                             allow_nonuniform=allow_nonuniform, progress=progress, hash_shards=hash_shards)
        options = RefitOptions(data=merging.text, tokens=merging.refit_tokens, steps=merging.refit_steps,
                               device=device, seq_len=merging.seq_len, seed=seed)
        refit(student, model_dir, work / "refit", options, progress=progress)
        from surgery.io import provenance

        record = provenance.read(work / "refit")  # heal's record stays under "heal" (a later heal reads it)
        local = next((x for x in record.get("heal", {}).get("stages", []) if x.get("stage") == "local"), {})
        record["refit"] = {"tokens": local.get("tokens"), "max_tokens": merging.refit_tokens,
                           "steps_per_layer": merging.refit_steps}
        record.setdefault("heal", {})["by"] = "prune --refit"  # a later `heal` replaces this record
        out.copy_folder(work / "refit")
        out.finish_record(record)
