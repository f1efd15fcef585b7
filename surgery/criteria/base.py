"""The criterion interface: what a criterion reads and how it ranks one layer's experts.

Convention: a higher score means a more important expert, i.e. one to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from surgery.errors import PlanError


Selector = Callable[[int, int | None], list[int]]  # (num_keep, n_group) -> kept expert ids
Ranker = np.ndarray | Selector  # per-layer scores (higher = keep) or a set selector
Layer = Mapping[str, np.ndarray]  # one layer's schema fields (float64; token_bits uint8), see stats_formats.schema
# expert id -> {"gate", "up", "down"} matrices; the layer's own (surgery.io.expert_weights.LayerWeights)
# also has router() -> the router weight [E, H]
ExpertWeights = Callable[[int], dict[str, np.ndarray]]
NEEDS = ("stats", "weights", "none")


@dataclass(frozen=True)
class LayerInput:
    """Everything a criterion may read about one MoE layer."""

    index: int  # checkpoint layer index (seeds `random` per layer)
    num_experts: int
    stats: Layer | None = None
    weights: ExpertWeights | None = None
    seed: int = 0


@dataclass(frozen=True)
class Criterion:
    """A named criterion.

    `score` ranks experts; `select`, when present, picks the kept set directly for a keep count
    (set objectives such as `recon` are not a sum of per-expert scores). `score` is None only for
    `auto`, which works on the whole statistics file (see surgery.criteria.auto). `directed`, when
    present, builds the criterion for the other drop direction (set selectors with a direction, such as
    MC-Suite's pair rule for ECC and ETS: `--drop low` picks the lowest pair instead of the highest).
    """

    name: str
    formula: str
    needs: str
    score: Callable[[LayerInput], np.ndarray] | None
    select: Callable[[LayerInput, int, int | None], list[int]] | None = None
    drop: str = "low"  # the direction the criterion drops by default (the paper's best, see `moe-surgery criteria`)
    directed: Callable[[str], Criterion] | None = None  # drop direction -> the criterion dropping that way

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"criterion {self.name}: needs must be one of {NEEDS}, not {self.needs!r}")

    def ranker(self, inp: LayerInput, scores: np.ndarray) -> np.ndarray | Selector:
        """What surgery.plan.select.make_plan takes for this layer: the selector if any, else the scores."""
        if self.select is None:
            return scores
        select = self.select
        return lambda num_keep, n_group: select(inp, num_keep, n_group)

    def layer_scores(self, inp: LayerInput) -> np.ndarray:
        """Per-expert scores of one layer (for selectors too: the plan records them)."""
        if self.score is None:
            raise ValueError(f"criterion {self.name} ranks whole statistics files, not single layers")
        return self.score(inp)


def from_stats(fn: Callable[[Layer], np.ndarray]) -> Callable[[LayerInput], np.ndarray]:
    """Adapt a function of the layer's statistics to the LayerInput interface."""

    def score(inp: LayerInput) -> np.ndarray:
        if inp.stats is None:
            raise ValueError("this criterion needs a statistics file")
        return fn(inp.stats)

    return score


def from_weights(fn: Callable[[ExpertWeights, int], np.ndarray]) -> Callable[[LayerInput], np.ndarray]:
    """Adapt a function of the experts' weight matrices to the LayerInput interface."""

    def score(inp: LayerInput) -> np.ndarray:
        if inp.weights is None:
            raise ValueError("this criterion needs the model's weights (--model)")
        return fn(inp.weights, inp.num_experts)

    return score


def from_router(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[LayerInput], np.ndarray]:
    """Adapt a function of the layer's router weight [E, H] (one row per expert) to the LayerInput interface."""

    def score(inp: LayerInput) -> np.ndarray:
        router = getattr(inp.weights, "router", None)
        if router is None:
            raise ValueError("this criterion needs the model's router weights (--model)")
        return fn(np.asarray(router(), dtype=np.float64))

    return score


def lowest_where(values: np.ndarray, undefined: np.ndarray) -> np.ndarray:
    """-inf where the statistic is undefined (e.g. a mean over no routed token): such experts rank last."""
    return np.where(undefined, -np.inf, values)


def unbiased_variance(sums: np.ndarray, sq_sums: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """(Q - S^2 / n) / (n - 1) from the sum S and the sum of squares Q of n values, element-wise.

    Undefined where n <= 1 (0 there; callers mark those experts). Not clipped: float cancellation may
    leave tiny negatives, which callers clip where they need a non-negative value.
    """
    n = np.asarray(n, dtype=np.float64)
    defined = n > 1
    safe = np.where(defined, n, 2.0)
    return np.where(defined, (sq_sums - sums**2 / safe) / (safe - 1), 0.0)


ADAPTERS = {"weights": from_weights, "router": from_router, "stats": from_stats}


def oriented_score(fn, reads: str, drop: str) -> Callable[[LayerInput], np.ndarray]:
    """The score of a signal read from `reads`, negated when the criterion drops its highest values."""
    raw = ADAPTERS[reads](fn)
    if drop == "low":
        return raw
    return lambda inp: negate(raw(inp))


def negate(scores: np.ndarray) -> np.ndarray:
    """-scores, except that -inf (undefined) stays -inf so such experts still rank last."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isneginf(s), -np.inf, -s)


DROPS = ("low", "high")


def oriented(crit: Criterion, drop: str | None) -> Criterion:
    """The criterion dropping `drop` ("low" / "high" of its signal); None or the default leaves it unchanged.

    Set selectors with a direction (`directed`: ECC and ETS's pair rule) are rebuilt for it; other set
    selectors (recon) and auto choose whole sets, which have no opposite direction: a PlanError.
    """
    if drop is None:
        return crit
    if drop not in DROPS:
        raise PlanError(f"--drop must be one of {DROPS}, not {drop!r}")
    if crit.directed is not None:
        return crit if drop == crit.drop else crit.directed(drop)
    if crit.select is not None or crit.score is None:
        raise PlanError(f"--drop does not apply to {crit.name}: it selects whole expert sets, not a score order")
    if drop == crit.drop:
        return crit
    score = crit.score

    def flipped(inp: LayerInput) -> np.ndarray:
        return negate(score(inp))

    return replace(crit, score=flipped)
