"""Every criterion by name, with its one-line formula and what it reads."""

from __future__ import annotations

from functools import partial

from surgery.criteria.activation import MONE_FORMULA, MONE_PAPER_FORMULA, mone, mone_paper
from surgery.criteria.auto import AUTO_FORMULA, CANDIDATES
from surgery.criteria.base import Criterion, from_stats, from_weights
from surgery.criteria.baseline import RANDOM_FORMULA, random_scores
from surgery.criteria.family import FAMILY_PREFIX, FAMILY_SYNTAX, PRESETS, family_name, formula, free_formula, parse_family, unified
from surgery.criteria.gradients import gradient_criteria
from surgery.criteria.mcsuite import mcsuite_criteria
from surgery.criteria.reconstruction import LOO_FORMULA, RECON_FORMULA, loo, recon_scores, recon_select
from surgery.criteria.weights import AIMER_FORMULA, WEIGHT_NORM_FORMULA, aimer, weight_norm
from surgery.errors import PlanError

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
        Criterion("mone-paper", MONE_PAPER_FORMULA, "stats", from_stats(mone_paper)),
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


def family_member(m: float, a: int, b: int) -> Criterion:
    """The unified family's member S(m, a, b) as a criterion named `family:M,A,B`."""
    return Criterion(family_name(m, a, b), free_formula(m, a, b), "stats", from_stats(partial(unified, m=m, a=a, b=b)))


def get_criterion(name: str) -> Criterion:
    """The criterion called `name`: a registered one, or any member `family:M,A,B` of the unified family.

    Read criteria by name through this (not CRITERIA[name]); an unknown name is a one-line PlanError.
    """
    if name in CRITERIA:
        return CRITERIA[name]
    if isinstance(name, str) and name.startswith(FAMILY_PREFIX):
        return family_member(*parse_family(name))
    raise PlanError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}, or {FAMILY_SYNTAX}")


def is_criterion(name: str) -> bool:
    """Whether get_criterion(name) resolves."""
    try:
        get_criterion(name)
    except PlanError:
        return False
    return True


def default_drop(name: str) -> str:
    """The direction a criterion drops by default (its own declaration; "low" for unknown names)."""
    return get_criterion(name).drop if is_criterion(name) else "low"
