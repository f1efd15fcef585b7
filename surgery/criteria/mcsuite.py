"""MC-Suite signals (arXiv 2504.05586) computable from the weights or the schema-v1 statistics.

Every signal has a default pruning direction: "low" drops the experts with the smallest signal (the
criterion's score is the signal), "high" drops the largest (the score is the negated signal), so the
registry keeps its convention higher score = keep. The paper's best are Min-EAN and Min-EGE; the
similarity signals (EWS, ETS, EAS) drop the most redundant experts, i.e. the highest. `oriented` flips
any criterion to the other direction (`--drop`). Undefined signals score -inf in both directions.

ETS is named but not defined in the texts we could read; we take it as Expert Token Similarity, the
routing family's counterpart of EWS / EAS / EGS (weight, activation, gradient similarity): the cosine
between experts' sets of routed token ids, from the same bit sets as EVTC.
"""

from __future__ import annotations


import numpy as np

from stats_formats import StatsError
from stats_formats.schema import HIST_HALF, HIST_LOG2_RANGE, HIST_STEPS

from surgery.errors import PlanError
from surgery.criteria.base import Criterion, ExpertWeights, Layer, lowest_where, oriented_score, unbiased_variance
from surgery.criteria.weights import MATRICES, WEIGHT_NORM_FORMULA, flattened, weight_norm

OUTLIER_SIGMAS = 3.0
SMOOTHING = 1 / 6 + 1 / 12  # variance (grid steps^2) of a value's linear split plus the even spread of a bin


def _mean_cosine_to_others(vectors: np.ndarray) -> np.ndarray:
    """Row i: mean over j != i of cos(v_i, v_j); a zero vector has cosine 0 with everything."""
    num = vectors.shape[0]
    if num < 2:
        return np.zeros(num)
    norms = np.linalg.norm(vectors, axis=1)
    unit = np.divide(vectors, norms[:, None], out=np.zeros_like(vectors), where=norms[:, None] > 0)
    cos = unit @ unit.T
    np.fill_diagonal(cos, 0.0)
    return cos.sum(axis=1) / (num - 1)


# weights (EWN is weight_norm itself, registered under both names)


def _stable_rank(w: np.ndarray) -> float:
    spectral = np.linalg.norm(w, 2)
    return float(np.sum(w**2) / spectral**2) if spectral > 0 else 0.0


def wsr(weights: ExpertWeights, num_experts: int) -> np.ndarray:
    """Stable rank ||W||_F^2 / ||W||_2^2 averaged over the three matrices (a zero matrix counts 0)."""
    out = np.empty(num_experts)
    for e in range(num_experts):
        mats = weights(e)
        out[e] = np.mean([_stable_rank(np.asarray(mats[k], dtype=np.float64)) for k in MATRICES])
    return out


def ews(weights: ExpertWeights, num_experts: int) -> np.ndarray:
    """Weight similarity: mean cosine between the expert's flattened gate|up|down and every other expert's."""
    return _mean_cosine_to_others(np.stack([flattened(weights, e) for e in range(num_experts)]))


def rwn(router: np.ndarray) -> np.ndarray:
    """Router weight norm: the L2 norm of the expert's row of the router weight [E, H]."""
    return np.linalg.norm(router, axis=1)


# routing and activations (statistics)


def _count(layer: Layer) -> np.ndarray:
    return np.asarray(layer["count"], dtype=np.float64)


def euf(layer: Layer) -> np.ndarray:
    """Expert utilisation frequency n_i / N (0 when no token reached the layer)."""
    tokens = float(np.asarray(layer["tokens"]).reshape(-1)[0])
    n = _count(layer)
    return n / tokens if tokens > 0 else np.zeros_like(n)


def ecc(layer: Layer) -> np.ndarray:
    """Co-selection sum_{j != i} C_ij / n_i; never-routed experts score -inf."""
    c = np.asarray(layer["coselect"], dtype=np.float64)
    n = _count(layer)
    with np.errstate(divide="ignore", invalid="ignore"):
        return lowest_where((c.sum(axis=1) - np.diag(c)) / n, n == 0)


_PRODUCED_BY = {"out_hist": "moe-surgery collect MODEL -d DATA --histogram"}


def _added_field(layer: Layer, name: str) -> np.ndarray:
    """An MC-Suite field, or a one-line error naming the collect command that writes it
    (older files lack token_bits; out_hist is opt-in)."""
    try:
        return np.asarray(layer[name])
    except (KeyError, StatsError) as e:
        command = _PRODUCED_BY.get(name, "moe-surgery collect MODEL -d DATA")
        raise PlanError(f"the statistics file has no {name}: re-run `{command}`") from e


def _token_sets(layer: Layer) -> np.ndarray:
    """[E, 8 B] 0/1: bit v of row i says whether a token with id v was routed to expert i (token_bits)."""
    return np.unpackbits(_added_field(layer, "token_bits").astype(np.uint8), axis=1, bitorder="little")


def evtc(layer: Layer) -> np.ndarray:
    """Vocabulary coverage: distinct token ids routed to i over distinct ids that reached the layer."""
    sets = _token_sets(layer)
    seen = int(sets.any(axis=0).sum())
    return sets.sum(axis=1) / seen if seen else np.zeros(sets.shape[0])


def ets(layer: Layer) -> np.ndarray:
    """Token similarity: mean cosine |T_i & T_j| / sqrt(|T_i| |T_j|) to every other expert's token-id set."""
    sets = _token_sets(layer)
    return lowest_where(_mean_cosine_to_others(sets.astype(np.float64)), ~sets.any(axis=1))


def ean(layer: Layer) -> np.ndarray:
    """MC-Suite EAN: sum_c sqrt(Q_ic)."""
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    return np.sqrt(np.clip(q, 0.0, None)).sum(axis=1)


def eae(layer: Layer) -> np.ndarray:
    """Gaussian entropy proxy 1/2 sum_c log(v_ic + 1e-12), v the unbiased per-channel variance; n_i <= 1 -> -inf."""
    n = _count(layer)
    s = np.asarray(layer["out_sum"], dtype=np.float64)
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    var = np.clip(unbiased_variance(s, q, n[:, None]), 0.0, None)  # clip float cancellation below 0
    return lowest_where(0.5 * np.log(var + 1e-12).sum(axis=1), ~(n > 1))


def eas(layer: Layer) -> np.ndarray:
    """Activation similarity: mean cosine between U_i / n_i and every other expert's; never routed -> -inf."""
    n = _count(layer)
    u = np.asarray(layer["out_unit_sum"], dtype=np.float64)
    direction = np.divide(u, n[:, None], out=np.zeros_like(u), where=n[:, None] > 0)
    return lowest_where(_mean_cosine_to_others(direction), n == 0)


def _grid(values: np.ndarray) -> np.ndarray:
    """The out_hist coordinate s(v) (stats_formats.schema): signed eighth octaves, clipped to the grid."""
    with np.errstate(divide="ignore"):
        magnitude = np.clip(HIST_STEPS * (np.log2(np.abs(values)) + HIST_LOG2_RANGE), 0, HIST_HALF)
    return np.sign(values) * magnitude


def _at(rows: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """rows[i] linearly interpolated at grid coordinate coords[i]."""
    x = coords + HIST_HALF
    k = np.clip(np.floor(x).astype(int), 0, 2 * HIST_HALF - 1)
    w = x - k
    r = np.arange(len(rows))
    return (1 - w) * rows[r, k] + w * rows[r, k + 1]


def eao(layer: Layer) -> np.ndarray:
    """Outlier count: routed output values beyond mu_i +- 3 sigma_i, mu and sigma over all n_i * H values.

    Counted from out_hist with each bin's weight spread evenly over +-half a grid step; together with
    the linear split of each value this smooths the count over about a step (variance SMOOTHING step^2),
    which the histogram's slope at each threshold undoes to first order. On the bf16 qwen3-moe-tiny
    fixture this is within 0.3% of the exact count per layer and 3% per expert (eighth-octave grid).
    """
    n = _count(layer)
    s = np.asarray(layer["out_sum"], dtype=np.float64)
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    values = np.where(n > 0, n * s.shape[1], 1.0)
    mu = s.sum(axis=1) / values
    sigma = np.sqrt(np.clip(q.sum(axis=1) / values - mu**2, 0.0, None))  # clip float cancellation below 0
    hist = _added_field(layer, "out_hist").astype(np.float64)
    slope = np.gradient(hist, axis=1)
    points = np.arange(-HIST_HALF, HIST_HALF + 1)
    hi, lo = _grid(mu + OUTLIER_SIGMAS * sigma), _grid(mu - OUTLIER_SIGMAS * sigma)
    above = (hist * np.clip(points + 0.5 - hi[:, None], 0.0, 1.0)).sum(axis=1) + SMOOTHING / 2 * _at(slope, hi)
    below = (hist * np.clip(lo[:, None] - (points - 0.5), 0.0, 1.0)).sum(axis=1) - SMOOTHING / 2 * _at(slope, lo)
    count = np.clip(above, 0.0, None) + np.clip(below, 0.0, None)
    return lowest_where(np.where(sigma > 0, count, 0.0), n == 0)


# name: (signal, what it reads, default drop, formula)
SIGNALS = {
    "mcs-ewn": (weight_norm, "weights", "low", f"{WEIGHT_NORM_FORMULA}  [MC-Suite EWN; drop low]"),
    "mcs-wsr": (wsr, "weights", "low",
                "mean over gate, up, down of ||W||_F^2 / ||W||_2^2  [stable rank WSR; drop low]"),
    "mcs-ews": (ews, "weights", "high",
                "-mean_{j!=i} cos(w_i, w_j), w = flat gate|up|down  [EWS similarity; drop high = most redundant]"),
    "mcs-rwn": (rwn, "router", "low", "||W_router[i, :]||_2, the expert's router row  [MC-Suite RWN; drop low]"),
    "mcs-euf": (euf, "stats", "low", "n_i / N  [EUF; drop low]"),
    "mcs-ecc": (ecc, "stats", "low", "sum_{j!=i} C_ij / n_i  [ECC co-selection; drop low; n_i=0 -> -inf]"),
    "mcs-evtc": (evtc, "stats", "low",
                 "|T_i| / |union_j T_j|, T_i = token ids routed to i at least once  [EVTC vocabulary coverage; drop low]"),
    "mcs-ets": (ets, "stats", "high",
                "-mean_{j!=i} |T_i & T_j| / sqrt(|T_i| |T_j|), cosine of token-id sets  [ETS token similarity "
                "(our reading); drop high = most redundant; T_i empty -> -inf]"),
    "mcs-ean": (ean, "stats", "low",
                "sum_c sqrt(Q_ic)  [MC-Suite EAN, not REAP's ean; drop low: paper's best Min-EAN]"),
    "mcs-eae": (eae, "stats", "low",
                "1/2 sum_c log(v_ic + 1e-12), v_ic = (Q_ic - S_ic^2/n_i)/(n_i - 1)  [EAE; drop low; n_i<=1 -> -inf]"),
    "mcs-eas": (eas, "stats", "high",
                "-mean_{j!=i} cos(U_i/n_i, U_j/n_j)  [EAS similarity; drop high = most redundant; n_i=0 -> -inf]"),
    "mcs-eao": (eao, "stats", "low",
                "#{routed f_ic outside mu_i +- 3 sigma_i}, mu, sigma over all n_i*H values; estimated from out_hist "
                "(eighth-octave bins, slope-corrected; ~0.3%/layer, ~3%/expert off)  [EAO outliers; drop low; n_i=0 -> -inf]"),
}


def mcsuite_criteria() -> list[Criterion]:
    """The router is read with the experts' weights (--model), so router signals need "weights"."""
    return [Criterion(name, formula, "weights" if reads == "router" else reads, oriented_score(fn, reads, drop), drop=drop)
            for name, (fn, reads, drop, formula) in SIGNALS.items()]
