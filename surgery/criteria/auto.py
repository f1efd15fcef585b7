"""`auto`: build the plan of each stats-based criterion and keep the one with the lowest held-out error.

The error of a plan is sum over layers of e_l(D_l) / e_l(all), with e(D) = sum_{i,j in D} K_ij on
the Gram of the held-out slice (see surgery.criteria.reconstruction): each layer's relative output
error without re-routing, so layers with large outputs do not dominate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from surgery.errors import PlanError
from surgery.criteria.base import Ranker
from surgery.criteria.base import Criterion, LayerInput
from surgery.criteria.reconstruction import drop_error

CANDIDATES = ("frequency", "soft_frequency", "reap", "ean", "man", "msan", "gated_sq", "mone", "recon")
AUTO_FORMULA = (
    f"argmin over {{{', '.join(CANDIDATES)}}} of held-out sum_l e_l(D_l)/e_l(all), e(D) = sum_{{i,j in D}} K_ij"
)
PlanFn = Callable[[Mapping[int, Ranker]], dict[int, list[int]]]  # make_plan with its counts bound


class HoldoutSource(Protocol):
    """The part of stats_formats.StatsFile that auto reads."""

    layers: list[int]
    has_holdout: bool

    def get(self, layer: int, field: str, holdout: bool = False) -> np.ndarray: ...


@dataclass(frozen=True)
class AutoResult:
    winner: str
    errors: dict[str, float]  # candidate -> held-out relative error, in candidate order
    keep: dict[int, list[int]]
    scores: dict[int, np.ndarray]  # the winner's per-layer scores


def holdout_grams(stats: HoldoutSource, layers: list[int], holdout_stats: HoldoutSource | None = None) -> dict[int, np.ndarray]:
    """Held-out Gram per layer: the `holdout.` slice of `stats`, or the main fields of `holdout_stats`."""
    if holdout_stats is not None:
        missing = sorted(set(layers) - set(holdout_stats.layers))
        if missing:
            raise PlanError(f"--holdout-stats lacks layers {missing} of the main statistics file")
        return {layer: holdout_stats.get(layer, "gram") for layer in layers}
    if not stats.has_holdout:
        raise PlanError(
            "criterion auto needs held-out statistics: collect with --holdout, or pass a second statistics "
            "file from other data with --holdout-stats"
        )
    return {layer: stats.get(layer, "gram", holdout=True) for layer in layers}


def holdout_error(keep: Mapping[int, list[int]], grams: Mapping[int, np.ndarray]) -> float:
    """Sum over layers of the relative output error of dropping the experts not in `keep`."""
    total = 0.0
    for layer, kept in keep.items():
        gram = np.asarray(grams[layer], dtype=np.float64)
        whole = float(gram.sum())
        dropped = np.setdiff1d(np.arange(gram.shape[0]), kept)
        if whole > 0 and dropped.size:
            total += drop_error(gram, dropped) / whole
    return total


def run_auto(
    candidates: Mapping[str, Criterion],
    inputs: Mapping[int, LayerInput],
    grams: Mapping[int, np.ndarray],
    plan_fn: PlanFn,
) -> AutoResult:
    """Plan with every candidate; the first lowest held-out error wins (candidate order breaks ties)."""
    scores: dict[str, dict[int, np.ndarray]] = {}
    plans: dict[str, dict[int, list[int]]] = {}
    for name, crit in candidates.items():
        scores[name] = {l: crit.layer_scores(inp) for l, inp in inputs.items()}
        plans[name] = plan_fn({l: crit.ranker(inp, scores[name][l]) for l, inp in inputs.items()})
    errors = {name: holdout_error(keep, grams) for name, keep in plans.items()}
    winner = min(errors, key=lambda name: errors[name])
    return AutoResult(winner, errors, plans[winner], scores[winner])


LOSS_FORMULA = "argmin over candidate plans (criterion x drop/merge) of the held-out next-token loss of the pruned model"


@dataclass(frozen=True)
class LossRanking:
    winner: str
    losses: dict[str, float]  # candidate -> measured held-out loss (nats per token), in candidate order


def rank_by_loss(candidates: list[str], measure: Callable[[str], float]) -> LossRanking:
    """auto by the real loss: `measure(name)` is the held-out next-token loss of the model with the candidate's
    experts removed or merged; every candidate is measured and the first lowest wins (candidate order breaks
    ties). Unlike the reconstruction proxy, the measurement sees re-routing and every layer's error together."""
    if not candidates:
        raise PlanError("auto by loss: no candidate plans")
    losses = {name: float(measure(name)) for name in candidates}
    return LossRanking(min(losses, key=lambda name: losses[name]), losses)
