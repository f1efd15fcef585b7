"""`moe-surgery criteria` and `moe-surgery score`: rank experts and write a keep plan (JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import numpy as np

from stats_formats import FIELDS, StatsError, StatsFile

from surgery.architectures import ArchitectureError, spec_for
from surgery.cli.options import drop_option
from surgery.criteria import AUTO, CRITERIA, Criterion, ExpertWeights, LayerInput, auto_candidates, holdout_grams, run_auto
from surgery.criteria import oriented
from surgery.io.expert_weights import expert_matrices
from surgery.io import Checkpoint, CheckpointError
from surgery.errors import PlanError
from surgery.plan.select import make_plan, plan_document

USER_ERRORS = (PlanError, StatsError, CheckpointError, ArchitectureError)
GLOBAL_WARNING = (
    "Warning: --global gives a non-uniform plan (expert counts differ per layer); vanilla transformers "
    "cannot load such a checkpoint (prune needs --allow-nonuniform)"
)


class StatsLayer(Mapping[str, np.ndarray]):
    """One layer's fields, read from the file only when a criterion asks (and then kept)."""

    def __init__(self, stats: StatsFile, layer: int) -> None:
        self._stats, self._layer = stats, layer
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self._cache:
            self._cache[field] = self._stats.get(self._layer, field)
        return self._cache[field]

    def __iter__(self) -> Iterator[str]:
        return iter(f.name for f in FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)


@dataclass(frozen=True)
class Source:
    """Where layers, counts and (optionally) statistics and weights come from."""

    layers: list[int]
    num_experts: int
    top_k: int
    n_group: int | None
    min_group_size: int
    stats: StatsFile | None
    weights: Callable[[int], ExpertWeights] | None


def _from_stats(stats: StatsFile) -> Source:
    m = stats.model
    return Source(stats.layers, stats.num_experts, int(m["top_k"]), m.get("n_group"), int(m.get("min_group_size", 1)),
                  stats, None)


def _from_model(model_dir: Path) -> Source:
    layers, num_experts, top_k, n_group, weights = expert_matrices(model_dir)
    min_group_size = spec_for(Checkpoint(model_dir).config).min_group_size
    return Source(layers, num_experts, top_k, n_group, min_group_size, None, weights)


def load_source(crit: Criterion, stats_path: Path | None, model_dir: Path | None) -> Source:
    """Open what the criterion needs; layer metadata comes from the statistics file when there is one."""
    if crit.needs == "stats" and stats_path is None:
        raise PlanError(f"criterion {crit.name} needs a statistics file (STATS argument)")
    if crit.needs == "weights" and model_dir is None:
        raise PlanError(f"criterion {crit.name} reads expert weights: pass --model DIR")
    if stats_path is None and model_dir is None:
        raise PlanError("give a statistics file or --model DIR so that the MoE layers are known")
    if stats_path is None:
        return _from_model(model_dir)
    source = _from_stats(StatsFile(stats_path))
    if crit.needs != "weights":
        return source
    model = _from_model(model_dir)
    missing = sorted(set(source.layers) - set(model.layers))
    if model.num_experts != source.num_experts or missing:
        raise PlanError(f"{model_dir} does not match {stats_path}: {model.num_experts} vs {source.num_experts} "
                        f"experts, statistics layers missing from the model: {missing}")
    return Source(source.layers, source.num_experts, source.top_k, source.n_group, source.min_group_size,
                  source.stats, model.weights)


def _inputs(src: Source, seed: int) -> dict[int, LayerInput]:
    return {
        l: LayerInput(
            l, src.num_experts,
            stats=StatsLayer(src.stats, l) if src.stats is not None else None,
            weights=src.weights(l) if src.weights is not None else None,
            seed=seed,
        )
        for l in src.layers
    }


def build_plan(
    crit: Criterion,
    src: Source,
    *,
    ratio: float | None,
    keep: int | None,
    global_rank: bool,
    seed: int,
    holdout_stats: Path | None,
    drop: str | None = None,
) -> dict:
    """The plan document for one criterion (for auto: the winner's plan plus every candidate's error).

    `drop` ("low" / "high"): drop the experts with the lowest or highest signal; None keeps the
    criterion's default (see surgery.criteria.mcsuite); refused for set selectors and auto.
    """
    crit = oriented(crit, drop)
    inputs = _inputs(src, seed)
    plan_fn = partial(make_plan, num_experts=src.num_experts, top_k=src.top_k, ratio=ratio, keep=keep,
                      global_rank=global_rank, groups=src.n_group, min_group_size=src.min_group_size)
    extra: dict[str, object] = {"num_experts": src.num_experts, "top_k": src.top_k, "n_group": src.n_group,
                                "global": global_rank, "seed": seed}
    if drop is not None:
        extra["drop"] = drop
    if crit.name == AUTO:
        grams = holdout_grams(src.stats, src.layers, StatsFile(holdout_stats) if holdout_stats else None)
        result = run_auto(auto_candidates(global_rank), inputs, grams, plan_fn)
        kept, scores = result.keep, result.scores
        extra["auto"] = {"winner": result.winner, "errors": result.errors}
    else:
        scores = {l: crit.layer_scores(inp) for l, inp in inputs.items()}
        kept = plan_fn({l: crit.ranker(inp, scores[l]) for l, inp in inputs.items()})
    removed = ratio if ratio is not None else (src.num_experts - keep) / src.num_experts
    sha = src.stats.sha256 if src.stats is not None else None
    return plan_document(kept, crit.name, removed, scores, sha, extra)


def _summary(doc: dict, output: Path) -> str:
    counts = [len(ids) for ids in doc["keep"].values()]
    kept = str(counts[0]) if doc["uniform"] else f"{min(counts)}-{max(counts)} (non-uniform)"
    lines = [f"Wrote {output}: {doc['criterion']} keeps {kept} of {doc['num_experts']} experts "
             f"in each of {len(counts)} MoE layers"]
    if "auto" in doc:
        lines += [f"  {name:<15} held-out error {err:.6g}" for name, err in doc["auto"]["errors"].items()]
        lines.append(f"  winner: {doc['auto']['winner']}")
    return "\n".join(lines)


@click.command("criteria")
def criteria_cmd() -> None:
    """List every criterion with what it reads and its formula (higher score = keep)."""
    width = max(map(len, CRITERIA))
    for crit in CRITERIA.values():
        click.echo(f"{crit.name:<{width}}  needs {crit.needs:<7}  {crit.formula}")


@click.command("score")
@click.argument("stats_path", metavar="[STATS]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--criterion", "name", required=True, type=click.Choice(list(CRITERIA)),
              help="See `moe-surgery criteria`.")
@click.option("--ratio", type=float, help="Fraction of experts removed per layer (0.25 removes 25%).")
@click.option("--keep", type=int, help="Experts kept per layer.")
@click.option("--global", "global_rank", is_flag=True,
              help="Rank experts across layers (scores divided by their layer's sum of |scores|) for the "
                   "same total; gives a NON-UNIFORM plan that vanilla transformers cannot load.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of `random` (layer l uses seed + l).")
@click.option("--holdout-stats", type=click.Path(dir_okay=False, path_type=Path),
              help="For auto: statistics from other data whose main fields serve as the held-out slice.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint folder, for weight criteria (weight_norm, aimer).")
@drop_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Plan JSON to write.")
def score_cmd(stats_path: Path | None, name: str, ratio: float | None, keep: int | None, global_rank: bool,
              seed: int, holdout_stats: Path | None, model_dir: Path | None, drop: str | None, output: Path) -> None:
    """Score experts and write a keep plan for `moe-surgery prune`.

    Give exactly one of --ratio and --keep; every layer keeps at least top_k experts.
    Group-limited routers (n_group > 1, e.g. DeepSeek-V3) keep the same number of experts in
    every group, chosen within the group, so the kept count must be a multiple of n_group.
    --global gives non-uniform plans, which vanilla transformers cannot load.
    STATS may be left out for weight-only criteria (aimer, weight_norm) and random with --model.
    """
    if global_rank:
        click.echo(GLOBAL_WARNING, err=True)
    try:
        crit = CRITERIA[name]
        src = load_source(crit, stats_path, model_dir)
        doc = build_plan(crit, src, ratio=ratio, keep=keep, global_rank=global_rank, seed=seed,
                         holdout_stats=holdout_stats, drop=drop)
        output.write_text(json.dumps(doc, indent=1) + "\n")
    except USER_ERRORS as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"Error: {output}: cannot write ({e.strerror or e})", err=True)
        sys.exit(2)
    click.echo(_summary(doc, output))
