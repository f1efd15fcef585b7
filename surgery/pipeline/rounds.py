"""Iterative pruning (`prune --rounds N`): collect → score → remove an equal share, N times.

Every round collects its statistics on the checkpoint pruned so far (a real rewritten
checkpoint in a temporary folder, so later rounds see the pruned model's routing and hidden
states). Id maps are composed across rounds; the output is one rewrite of the ORIGINAL
checkpoint with the composed plan, so `pruning.json` maps every kept expert to its original id
and `plan.rounds` records each round's criterion, keep count and plan (in that round's ids).

With `novices`, the output keeps every expert id and replaces each removed expert by its mean
output (`prune --novices`), taken from the first round's statistics: those of the unpruned
model, as in a one-shot `--novices` prune.

`progressive` (`prune --rounds N --progressive`) prunes by layer blocks instead: round r decides the whole keep-list of the
r-th block of MoE layers (top to bottom) from statistics collected with the blocks above
already pruned in memory (`collect --progressive`), as in NAEE's progressive mode.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from surgery.architectures import resolve
from surgery.architectures.layout import active_groups
from surgery.collect.options import CollectOptions
from surgery.errors import PlanError
from surgery.io import Checkpoint, provenance
from surgery.io.derived import DerivedCheckpoint, as_output
from surgery.plan import Plan
from surgery.rewrite.experts import rewrite_checkpoint

NOVICE_STATS = "novice-stats.safetensors"  # the first round's statistics, kept for --novices
# (model_dir, statistics file or None, experts kept per layer) -> the round's Plan
Scorer = Callable[[Path, Path | None, int], Plan]
# (model_dir, statistics file to write, progressive plan or None) -> None
Collector = Callable[[Path, Path, dict[int, list[int]] | None], None]
# (pruned student, the checkpoint it was pruned from, output folder, round index from 0) -> the heal record
Healer = Callable[[Path, Path, Path, int], dict]


@dataclass
class RoundsResult:
    out_dir: Path
    keep: dict[int, list[int]]
    rounds: list[dict] = field(default_factory=list)
    peak_disk_bytes: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        counts = " → ".join(str(r["keep_per_layer"]) for r in self.rounds)
        return [f"{len(self.rounds)} rounds ({counts} experts per layer) in {self.seconds:.1f} s; "
                f"peak temporary disk use {self.peak_disk_bytes / 2**20:.1f} MiB."]


@dataclass(frozen=True)
class ModelShape:
    num_experts: int
    top_k: int
    groups: int
    layers: list[int]
    num_hidden_layers: int


def model_shape(model_dir: Path) -> ModelShape:
    with Checkpoint(model_dir) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    return ModelShape(layout.num_experts, layout.top_k, active_groups(layout) or 1, sorted(layout.layers),
                      layout.num_hidden_layers)


def schedule(num_experts: int, keep: int, rounds: int, groups: int = 1) -> list[int]:
    """Experts kept per layer after each round: (E - K) / N removed per round, the remainder
    going to the first rounds, in whole multiples of the router's group count."""
    if rounds < 1:
        raise PlanError(f"--rounds must be at least 1, not {rounds}")
    if (num_experts - keep) % groups:
        raise PlanError(f"keeping {keep} of {num_experts} experts is invalid for a router with n_group={groups}: "
                        f"keep a multiple of {groups}")
    units = (num_experts - keep) // groups
    if units < rounds:
        raise PlanError(f"cannot remove {num_experts - keep} experts in {rounds} rounds: every round removes at least "
                        f"{groups} per layer")
    base, extra = divmod(units, rounds)
    counts, left = [], num_experts
    for r in range(rounds):
        left -= (base + (r < extra)) * groups
        counts.append(left)
    return counts


def layer_blocks(layers: list[int], rounds: int) -> list[list[int]]:
    """MoE layers split top to bottom into `rounds` contiguous blocks (the first ones one larger)."""
    if not 1 <= rounds <= len(layers):
        raise PlanError(f"progressive pruning needs 1 to {len(layers)} rounds (one per block of MoE layers), "
                        f"not {rounds}")
    base, extra = divmod(len(layers), rounds)
    blocks, start = [], 0
    for r in range(rounds):
        size = base + (r < extra)
        blocks.append(layers[start:start + size])
        start += size
    return blocks


def _disk_usage(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _compose(keep: dict[int, list[int]], step: dict[int, list[int]]) -> dict[int, list[int]]:
    """Original ids kept after a round whose plan `step` uses the previous round's new ids."""
    return {layer: [ids[i] for i in step[layer]] if layer in step else ids for layer, ids in keep.items()}


def _final_plan(keep: dict[int, list[int]], rounds: list[dict], criterion: str, num_experts: int, mode: str,
                label: str) -> Plan:
    """The composed plan in original ids; `rounds` records each round's plan in that round's ids."""
    kept = len(next(iter(keep.values())))
    return Plan(dict(sorted(keep.items())), criterion, (num_experts - kept) / num_experts,
                extra={"mode": mode, "rounds": rounds}, label=label)


def _round_entry(index: int, criterion: str, keep: int, plan: Plan, layers: list[int] | None = None) -> dict:
    entry = {"round": index + 1, "criterion": criterion, "keep_per_layer": keep, "plan": plan.to_json()}
    if layers is not None:
        entry["layers"] = layers
    return entry


def iterative(model_dir: Path, out_dir: Path | DerivedCheckpoint, *, rounds: int, keep: int, criterion: str,
              score: Scorer, collect: Collector | None, work_dir: Path | None = None, novices: bool = False,
              heal: Healer | None = None, **rewrite_kw) -> RoundsResult:
    """Prune to `keep` experts per layer in `rounds` equal steps, re-collecting on each pruned checkpoint.

    `collect` is None for criteria that read no statistics. Temporary checkpoints live in a
    folder under `work_dir` (default: the output's temporary folder) and are removed at the end. With `heal`,
    each round's removal is healed against the checkpoint it was cut from before the next round
    estimates, and the output is the last healed checkpoint (its weights are no longer the original's).
    The output folder is opened (an existing one refused) before the first round.
    """
    start = time.perf_counter()
    shape = model_shape(model_dir)
    counts = schedule(shape.num_experts, keep, rounds, shape.groups)
    # MTP layers are never run, so never scored: the rewriter gives them the last main layer's keep-list.
    kept = {layer: list(range(shape.num_experts)) for layer in shape.layers if layer < shape.num_hidden_layers}
    out = as_output(out_dir, rewrite_kw.get("overwrite", False), [model_dir])
    result = RoundsResult(out.out_dir, kept)
    with out, _work_folder(out, work_dir) as tmp:
        current = model_dir
        for r, count in enumerate(counts):
            stats = tmp / f"round{r + 1}.safetensors"
            if collect is not None:
                collect(current, stats, None)
                result.peak_disk_bytes = max(result.peak_disk_bytes, _disk_usage(tmp))
            step = score(current, stats if collect is not None else None, count)
            kept = _compose(kept, step.keep)
            result.rounds.append(_round_entry(r, criterion, count, step))
            _keep_or_drop(stats, r, novices)
            if heal is not None:
                current = _healed_checkpoint(current, step, tmp / f"round{r + 1}", partial(heal, index=r), result,
                                             model_dir, tmp)
            elif r + 1 < len(counts):
                current = _next_checkpoint(model_dir, kept, tmp / f"round{r + 1}", current, result, tmp)
        result.keep = kept
        plan = _final_plan(kept, result.rounds, criterion, shape.num_experts, "iterative", f"{criterion} rounds")
        if heal is not None:
            _write_healed(model_dir, current, out, plan, result.rounds)
        else:
            _write(model_dir, plan, out, tmp, novices, rewrite_kw)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _work_folder(out: DerivedCheckpoint, work_dir: Path | None) -> Iterator[Path]:
    """A folder for the rounds' statistics and checkpoints, removed at the end (before `out` is committed):
    under `work_dir`, or by default inside the output's temporary folder, so that the output's own cleanup
    (errors, signals, a later run finding a dead run's leftovers) covers it too."""
    tmp = Path(tempfile.mkdtemp(prefix=".rounds-", dir=work_dir or out.tmp.resolve()))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _next_checkpoint(model_dir: Path, kept: dict[int, list[int]], dest: Path, previous: Path,
                     result: RoundsResult, tmp: Path) -> Path:
    """Rewrite the original checkpoint with the composed plan; drop the previous temporary one."""
    rewrite_checkpoint(model_dir, Plan(kept, label="round plan"), dest, hash_shards=False)
    result.peak_disk_bytes = max(result.peak_disk_bytes, _disk_usage(tmp))
    if previous != model_dir:
        shutil.rmtree(previous)
    return dest


def _healed_checkpoint(current: Path, step: Plan, dest: Path, heal: Healer, result: RoundsResult,
                       model_dir: Path, tmp: Path) -> Path:
    """Remove this round's experts from `current`, heal the result against `current`, drop `current`."""
    pruned = rewrite_checkpoint(current, Plan(step.keep, label="round plan"), dest.with_name(dest.name + "-pruned"))
    record = heal(pruned, current, dest)
    result.rounds[-1]["heal"] = {k: v for k, v in record.items() if k != "tensors_written"}
    result.peak_disk_bytes = max(result.peak_disk_bytes, _disk_usage(tmp))
    shutil.rmtree(pruned)
    if current != model_dir:
        shutil.rmtree(current)
    return dest


def _write_healed(model_dir: Path, healed: Path, out: DerivedCheckpoint, plan: Plan, rounds: list[dict]) -> None:
    """The last healed checkpoint, with a pruning.json that maps its experts to the original's ids."""
    doc = provenance.read(healed)
    with Checkpoint(model_dir) as ckpt:
        source = provenance.source(ckpt)
    doc.update({
        "source": source,
        "num_experts_before": model_shape(model_dir).num_experts,
        "expert_map": {str(layer): ids for layer, ids in sorted(plan.keep.items())},
        "plan": plan.to_json(),
        "heal": [r["heal"] for r in rounds],
    })
    with out:
        out.copy_folder(healed)
        out.finish_record(doc)


def progressive(model_dir: Path, out_dir: Path | DerivedCheckpoint, *, rounds: int, keep: int, criterion: str,
                score: Scorer, collect: Collector, work_dir: Path | None = None, novices: bool = False,
                **rewrite_kw) -> RoundsResult:
    """Prune block by block of MoE layers, each block scored on statistics collected with the
    blocks above it pruned in memory; one rewrite of the original checkpoint at the end."""
    start = time.perf_counter()
    shape = model_shape(model_dir)
    main_layers = [layer for layer in shape.layers if layer < shape.num_hidden_layers]
    kept: dict[int, list[int]] = {}
    out = as_output(out_dir, rewrite_kw.get("overwrite", False), [model_dir])
    result = RoundsResult(out.out_dir, kept)
    with out, _work_folder(out, work_dir) as tmp:
        for r, block in enumerate(layer_blocks(main_layers, rounds)):
            stats = tmp / f"round{r + 1}.safetensors"
            collect(model_dir, stats, dict(kept) or None)
            result.peak_disk_bytes = max(result.peak_disk_bytes, _disk_usage(tmp))
            step = score(model_dir, stats, keep)
            kept.update({layer: list(step.keep[layer]) for layer in block})
            result.rounds.append(_round_entry(r, criterion, keep, step, block))
            _keep_or_drop(stats, r, novices)
        result.keep = kept
        plan = _final_plan(kept, result.rounds, criterion, shape.num_experts, "progressive", f"{criterion} progressive")
        _write(model_dir, plan, out, tmp, novices, rewrite_kw)
    result.seconds = time.perf_counter() - start
    return result


def _keep_or_drop(stats: Path, index: int, novices: bool) -> None:
    """Delete a round's statistics, except the first round's when novices need them."""
    if novices and index == 0:
        stats.rename(stats.with_name(NOVICE_STATS))
    else:
        stats.unlink(missing_ok=True)


def _write(model_dir: Path, plan: Plan, out: DerivedCheckpoint, tmp: Path, novices: bool, rewrite_kw: dict) -> None:
    """The output: a rewrite of the original checkpoint, or its novice version."""
    if not novices:
        rewrite_checkpoint(model_dir, plan, out, **rewrite_kw)
        return
    from stats_formats import StatsFile

    from surgery.rewrite.novices import write_novice_checkpoint

    write_novice_checkpoint(model_dir, plan, StatsFile(tmp / NOVICE_STATS), out, **rewrite_kw)


def make_collector(data: list[str], options: CollectOptions, seed: int, calibration: dict) -> Collector:
    """`collect` with the prune command's collect options; keeps the first round's calibration record."""

    def run(model_dir: Path, stats: Path, plan: dict[int, list[int]] | None) -> None:
        from stats_formats import StatsFile

        from surgery.collect.run import collect

        collect(model_dir, data, stats, replace(options, seed=seed, progressive=plan))
        calibration.setdefault("first", StatsFile(stats).calibration)

    return run


def prune_in_rounds(model_dir: Path, out_dir: Path, *, data: list[str], rounds: int | None, progressive_mode: bool,
                    criterion: str, ratio: float | None, keep: int | None, score: Scorer, collect_options: CollectOptions,
                    seed: int, novices: bool = False, heal: Healer | None = None,
                    **rewrite_kw) -> tuple[RoundsResult, dict | None]:
    """`prune -d DATA [--rounds N] [--progressive]`: checks the options, runs the rounds, returns
    the result and the first round's calibration record (None when nothing was collected)."""
    from surgery.criteria import get_criterion
    from surgery.criteria.gradients import SIGNALS as GRADIENT_SIGNALS
    from surgery.plan.select import keep_count

    crit = get_criterion(criterion)
    if crit.needs == "stats" and not data:
        raise PlanError(f"--rounds with criterion {criterion} needs calibration text: pass -d DATA")
    if novices and not data:
        raise PlanError("--novices with --rounds needs calibration text (-d DATA): novices are mean expert outputs")
    if progressive_mode and (crit.needs != "stats" or not data):
        raise PlanError("--progressive needs a criterion that reads statistics and calibration text (-d DATA)")
    shape = model_shape(model_dir)
    target = keep_count(shape.num_experts, shape.top_k, ratio=ratio, keep=keep)
    calibration: dict = {}
    # mcs-eg* read `collect --gradients`, mcs-eao `collect --histogram`
    gradients = (collect_options.gradients or "per-sequence") if criterion in GRADIENT_SIGNALS else None
    options = replace(collect_options, gradients=gradients, histogram=criterion == "mcs-eao")
    collector = make_collector(data, options, seed, calibration) if crit.needs == "stats" or novices else None
    if heal is not None and (progressive_mode or novices):
        raise PlanError("--heal-between heals the checkpoints of plain --rounds: not with --progressive or --novices")
    if progressive_mode:
        result = progressive(model_dir, out_dir, rounds=rounds or 1, keep=target, criterion=criterion, score=score,
                             collect=collector, novices=novices, **rewrite_kw)
    else:
        result = iterative(model_dir, out_dir, rounds=rounds or 1, keep=target, criterion=criterion, score=score,
                           collect=collector, novices=novices, heal=heal, **rewrite_kw)
    return result, calibration.get("first")
