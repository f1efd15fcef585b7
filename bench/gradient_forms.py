"""How much `collect --gradients accumulated` changes the gradient signals: per criterion (mcs-egs/ego/ege/egn),
the mean over MoE layers of the Spearman rank correlation between two statistics files' scores and the
overlap of their 25% and 50% drop sets. No model is loaded.

  python bench/gradient_forms.py accumulated.safetensors per-sequence.safetensors
"""

from __future__ import annotations

import sys

import numpy as np

from stats_formats import StatsFile
from surgery.criteria import CRITERIA, LayerInput


def ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)


a, b = StatsFile(sys.argv[1]), StatsFile(sys.argv[2])
print("criterion | mean Spearman rho over layers | drop-set overlap 25% | drop-set overlap 50%")
for name in ("mcs-egs", "mcs-ego", "mcs-ege", "mcs-egn"):
    rhos, o25, o50 = [], [], []
    for layer in a.layers:
        e = a.model["num_experts"]
        sa = CRITERIA[name].layer_scores(LayerInput(layer, e, stats=a.layer(layer)))
        sb = CRITERIA[name].layer_scores(LayerInput(layer, e, stats=b.layer(layer)))
        sa, sb = np.nan_to_num(sa, neginf=-1e300), np.nan_to_num(sb, neginf=-1e300)
        rhos.append(np.corrcoef(ranks(sa), ranks(sb))[0, 1])
        for frac, acc in ((0.25, o25), (0.5, o50)):
            k = int(e * frac)
            da, db = set(np.argsort(sa, kind="stable")[:k]), set(np.argsort(sb, kind="stable")[:k])
            acc.append(len(da & db) / k)
    print(f"{name} | {np.mean(rhos):.2f} | {np.mean(o25):.0%} | {np.mean(o50):.0%}")
