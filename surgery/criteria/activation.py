"""MoNE (arXiv 2507.00390, official code zxgx/mode-pd): output variance times a frequency term.

The paper's text and its official code define the frequency term differently; both are offered:
- `mone` (official code): phi_freq = sum_t r_i g_i / N, the gate mass over all calibration tokens;
- `mone-paper` (paper text): phi_freq = sum_t r_i g_i / n_i, the mean gate while routed.
"""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import Layer, lowest_where, unbiased_variance

_VAR = "phi_var = sqrt(sum_c (Q_ic - S_ic^2/n_i)/(n_i - 1)); n_i<=1 -> -inf"
MONE_FORMULA = f"phi_var * phi_freq, phi_freq = M_g[1,0]/N (gate mass over all tokens: MoNE's official code), {_VAR}"
MONE_PAPER_FORMULA = f"phi_var * phi_freq, phi_freq = M_g[1,0]/n_i (mean gate while routed: MoNE's paper text), {_VAR}"


def _phi_var(layer: Layer, n: np.ndarray) -> np.ndarray:
    s = np.asarray(layer["out_sum"], dtype=np.float64)
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    var_sum = unbiased_variance(s, q, n[:, None]).sum(axis=1)
    return np.sqrt(np.clip(var_sum, 0.0, None))  # clip float cancellation below 0


def mone(layer: Layer) -> np.ndarray:
    """Experts whose output barely varies (cheap to replace by their mean) and carry little gate mass rank low."""
    n = np.asarray(layer["count"], dtype=np.float64)
    tokens = float(np.asarray(layer["tokens"]).reshape(-1)[0])
    phi_freq = np.asarray(layer["moment_g"], dtype=np.float64)[1, 0] / tokens if tokens > 0 else np.zeros_like(n)
    return lowest_where(_phi_var(layer, n) * phi_freq, ~(n > 1))


def mone_paper(layer: Layer) -> np.ndarray:
    """As `mone`, with the paper text's frequency term: the mean gate over the expert's routed tokens."""
    n = np.asarray(layer["count"], dtype=np.float64)
    gate_sum = np.asarray(layer["moment_g"], dtype=np.float64)[1, 0]
    phi_freq = np.divide(gate_sum, n, out=np.zeros_like(n), where=n > 0)
    return lowest_where(_phi_var(layer, n) * phi_freq, ~(n > 1))
