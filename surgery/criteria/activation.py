"""MoNE (arXiv 2507.00390, official code zxgx/mode-pd): output variance times gate mass."""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import Layer, lowest_where, unbiased_variance

MONE_FORMULA = (
    "phi_var * phi_freq, phi_freq = M_g[1,0]/N, phi_var = sqrt(sum_c (Q_ic - S_ic^2/n_i)/(n_i - 1)); n_i<=1 -> -inf"
)


def mone(layer: Layer) -> np.ndarray:
    """Experts whose output barely varies (cheap to replace by their mean) and carry little gate mass rank low."""
    n = np.asarray(layer["count"], dtype=np.float64)
    tokens = float(np.asarray(layer["tokens"]).reshape(-1)[0])
    phi_freq = np.asarray(layer["moment_g"], dtype=np.float64)[1, 0] / tokens if tokens > 0 else np.zeros_like(n)
    s = np.asarray(layer["out_sum"], dtype=np.float64)
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    defined = n > 1
    var_sum = unbiased_variance(s, q, n[:, None]).sum(axis=1)
    phi_var = np.sqrt(np.clip(var_sum, 0.0, None))  # clip float cancellation below 0
    return lowest_where(phi_var * phi_freq, ~defined)
