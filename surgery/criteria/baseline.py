"""The random baseline: a floor any real criterion should beat."""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import LayerInput

RANDOM_FORMULA = "uniform scores from numpy default_rng(seed + layer)"


def random_scores(inp: LayerInput) -> np.ndarray:
    """Seeded per layer so that a plan is reproducible and layers differ."""
    return np.random.default_rng(inp.seed + inp.index).random(inp.num_experts)
