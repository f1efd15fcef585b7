"""Scores → plan: open what a criterion reads (statistics, expert weights), score every MoE layer, pick the keep-lists.

`score_plan(model_dir, stats_path, ScoreOptions(...))` is what `prune`, `sparsify`, `demo` and the
bench scripts call; `load_source` + `build_plan` are its two halves (`score` uses them without a model).
Both give a `surgery.plan.Plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from stats_formats import FIELDS, StatsFile

from surgery.architectures import spec_for
from surgery.criteria import AUTO, CRITERIA, Criterion, ExpertWeights, LayerInput, auto_candidates, holdout_grams, run_auto
from surgery.criteria import get_criterion, oriented
from surgery.errors import PlanError
from surgery.io import Checkpoint
from surgery.io.expert_weights import expert_matrices
from surgery.io.identity import check_stats_match
from surgery.pipeline.score_options import GLOBAL_WARNING, ScoreOptions  # noqa: F401 - re-exported
from surgery.plan import Plan
from surgery.plan.select import make_plan


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


def build_plan(crit: Criterion, src: Source, options: ScoreOptions) -> Plan:
    """The plan of one criterion (for auto: the winner's plan plus every candidate's error in `extra`),
    labelled "<criterion> plan" for error messages.

    `options.criterion` is not read: `crit` is the criterion object (load_source opened what it needs).
    """
    ratio, keep, global_rank, seed = options.ratio, options.keep, options.global_rank, options.seed
    crit = oriented(crit, options.drop)
    inputs = _inputs(src, seed)
    plan_fn = partial(make_plan, num_experts=src.num_experts, top_k=src.top_k, ratio=ratio, keep=keep,
                      global_rank=global_rank, groups=src.n_group, min_group_size=src.min_group_size)
    extra: dict[str, object] = {"num_experts": src.num_experts, "top_k": src.top_k, "n_group": src.n_group,
                                "global": global_rank, "seed": seed}
    if options.drop is not None:
        extra["drop"] = options.drop
    if crit.name == AUTO:
        holdout = StatsFile(options.holdout_stats) if options.holdout_stats else None
        result = run_auto(auto_candidates(global_rank), inputs, holdout_grams(src.stats, src.layers, holdout), plan_fn)
        kept, scores = result.keep, result.scores
        extra["auto"] = {"winner": result.winner, "errors": result.errors}
    else:
        scores = {l: crit.layer_scores(inp) for l, inp in inputs.items()}
        kept = plan_fn({l: crit.ranker(inp, scores[l]) for l, inp in inputs.items()})
    removed = ratio if ratio is not None else (src.num_experts - keep) / src.num_experts
    sha = src.stats.sha256 if src.stats is not None else None
    return Plan(kept, crit.name, removed, scores, sha, extra, label=f"{crit.name} plan")


def criterion(name: str | None) -> Criterion:
    """The registered criterion called `name` (the CLI validates names as it parses; this guards the API)."""
    if name is None:
        raise PlanError(f"no criterion given; choose from {', '.join(CRITERIA)}, or family:M,A,B")
    return get_criterion(name)


def score_plan(model_dir: Path, stats_path: Path | None, options: ScoreOptions) -> Plan:
    """The plan for MODEL_DIR, refusing statistics that belong to another model.

    Weight criteria (and any criterion when `stats_path` is None) read the checkpoint's experts.
    """
    crit = criterion(options.criterion)
    if (options.ratio is None) == (options.keep is None):
        raise PlanError("give exactly one of --ratio and --keep")
    weights_dir = model_dir if crit.needs == "weights" or stats_path is None else None
    src = load_source(crit, stats_path, weights_dir)
    if src.stats is not None:
        check_stats_match(model_dir, src.stats)
    return build_plan(crit, src, options)

