"""Every criterion by name, with its one-line formula and what it reads."""

from __future__ import annotations

from functools import partial

from surgery.criteria.activation import MONE_FORMULA, mone
from surgery.criteria.auto import AUTO_FORMULA, CANDIDATES
from surgery.criteria.base import Criterion, from_stats, from_weights
from surgery.criteria.baseline import RANDOM_FORMULA, random_scores
from surgery.criteria.family import PRESETS, formula, unified
from surgery.criteria.gradients import gradient_criteria
from surgery.criteria.mcsuite import mcsuite_criteria
from surgery.criteria.reconstruction import LOO_FORMULA, RECON_FORMULA, loo, recon_scores, recon_select
from surgery.criteria.weights import AIMER_FORMULA, WEIGHT_NORM_FORMULA, aimer, weight_norm

AUTO = "auto"


def _family() -> list[Criterion]:
    return [
        Criterion(name, formula(*mab), "stats", from_stats(partial(unified, m=mab[0], a=mab[1], b=mab[2])))
        for name, mab in PRESETS.items()
    ]


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in [
        *_family(),
        Criterion("mone", MONE_FORMULA, "stats", from_stats(mone)),
        Criterion("loo", LOO_FORMULA, "stats", loo),
        Criterion("recon", RECON_FORMULA, "stats", recon_scores, select=recon_select),
        Criterion(AUTO, AUTO_FORMULA, "stats", None),
        Criterion("weight_norm", WEIGHT_NORM_FORMULA, "weights", from_weights(weight_norm)),
        Criterion("aimer", AIMER_FORMULA, "weights", from_weights(aimer)),
        Criterion("random", RANDOM_FORMULA, "none", random_scores),
        *mcsuite_criteria(),
        *gradient_criteria(),
    ]
}


def auto_candidates(global_rank: bool) -> dict[str, Criterion]:
    """The criteria auto compares; set selectors (recon) have no cross-layer scores, so not under --global."""
    return {n: CRITERIA[n] for n in CANDIDATES if not (global_rank and CRITERIA[n].select is not None)}


def default_drop(name: str) -> str:
    """The direction a criterion drops by default (its own declaration; "low" for unknown names)."""
    return CRITERIA[name].drop if name in CRITERIA else "low"
