"""MC-Suite's gradient signals (arXiv 2504.05586, Sec. 2.5: EGS, EGE, EGO, EGN) from `collect --gradients`.

The paper takes each signal of the gradient accumulated over the whole calibration set. A statistic
of a summed gradient cannot be merged across data shards or ranks, so the statistics file holds
sums over calibration sequences of per-sequence statistics instead (stats_formats.schema,
GRADIENT_FIELDS; G_{s,i} is sequence s's gradient for expert i's gate, up and down matrices). Each
criterion below is the paper's formula applied to that: with one sequence it is the paper's exactly, and
so with `collect --gradients accumulated`, whose fields are those of the summed gradient taken once.
- EGS: mean cosine to the other experts from the Gram K^g_ij = sum_s <G_{s,i}, G_{s,j}>;
- EGE: 1/2 sum_j log v_ij, v_ij the variance of the entries of hidden dimension j pooled over sequences;
- EGO: entries beyond mean +- 3 std of each G_{s,i}, counted per sequence and summed;
- EGN: sqrt(K^g_ii), the root of the summed squared per-sequence gradient norms.
Directions: EGE drops the smallest ("low": Min-EGE, the paper's best gradient criterion, Table 1); the
paper states no best for the others: EGS drops the most similar ("high", as EAS), EGO and EGN the smallest.
"""

from __future__ import annotations

import numpy as np

from stats_formats import StatsError

from surgery.errors import PlanError
from surgery.criteria.base import Criterion, Layer, lowest_where, oriented_score, unbiased_variance


def _field(layer: Layer, name: str) -> np.ndarray:
    """A gradient field, or a one-line error naming the option that writes it."""
    try:
        return np.asarray(layer[name], dtype=np.float64)
    except (KeyError, StatsError) as e:
        missing = str(e) if isinstance(e, StatsError) else f"no {name}"  # a file's error names the file
        raise PlanError(f"{missing}: gradient statistics are written by "
                        "`moe-surgery collect MODEL -d DATA --gradients`; re-run it") from e


def _sq_norms(layer: Layer) -> np.ndarray:
    return np.clip(np.diag(_field(layer, "grad_gram")), 0.0, None)


def egn(layer: Layer) -> np.ndarray:
    """sqrt(sum_s ||G_{s,i}||^2): the diagonal of the gradient Gram."""
    return np.sqrt(_sq_norms(layer))


def egs(layer: Layer) -> np.ndarray:
    """Mean over j != i of K^g_ij / sqrt(K^g_ii K^g_jj); an expert without gradient scores -inf."""
    gram = _field(layer, "grad_gram")
    norms = np.sqrt(_sq_norms(layer))
    outer = np.outer(norms, norms)
    cos = np.divide(gram, outer, out=np.zeros_like(gram), where=outer > 0)
    np.fill_diagonal(cos, 0.0)
    num = len(norms)
    mean = cos.sum(axis=1) / (num - 1) if num > 1 else np.zeros(num)
    return lowest_where(mean, norms == 0)


def ege(layer: Layer) -> np.ndarray:
    """1/2 sum_j log v_ij, v_ij = (Q_ij - S_ij^2/n) / (n - 1) pooled over sequences; any v_ij = 0 -> -inf."""
    n = float(_field(layer, "grad_hidden_count").reshape(-1)[0])
    s = _field(layer, "grad_hidden_sum")
    q = _field(layer, "grad_hidden_sq_sum")
    if n <= 1:
        return np.full(s.shape[0], -np.inf)
    var = np.clip(unbiased_variance(s, q, n), 0.0, None)  # clip float cancellation below 0
    with np.errstate(divide="ignore"):
        return 0.5 * np.log(var).sum(axis=1)


def ego(layer: Layer) -> np.ndarray:
    """Entries of G_{s,i} outside mean +- 3 std of G_{s,i}, summed over sequences."""
    return _field(layer, "grad_outliers")


# name: (signal, default drop, formula)
SIGNALS = {
    "mcs-egs": (egs, "high", ("-mean_{j!=i} K^g_ij / sqrt(K^g_ii K^g_jj), K^g_ij = sum_s <G_si, G_sj> per-sequence gradient "
                              "Gram  [EGS Eq. 14; drop high = most redundant: ours, the paper states no best; no gradient -> -inf; "
                              "collect --gradients]")),
    "mcs-ege": (ege, "low", ("1/2 sum_j log v_ij, v_ij = variance of G_si's entries in hidden dim j pooled over sequences s  "
                             "[EGE Eq. 15; drop low: Min-EGE, Table 1 and Fig. 14; v=0 -> -inf; collect --gradients]")),
    "mcs-ego": (ego, "low", ("sum_s #entries of G_si outside mean +- 3 std of G_si  [EGO Sec. 2.5 3; drop low: ours, the paper states "
                            "no best; collect --gradients]")),
    "mcs-egn": (egn, "low", ("sqrt(sum_s ||G_si||^2), G_si = d(loss of sequence s)/d(expert i's gate, up, down)  "
                             "[EGN Eq. 16; drop low: ours, the paper states no best; collect --gradients]")),
}


def gradient_criteria() -> list[Criterion]:
    return [Criterion(name, formula, "stats", oriented_score(fn, "stats", drop), drop=drop) for name, (fn, drop, formula) in SIGNALS.items()]
