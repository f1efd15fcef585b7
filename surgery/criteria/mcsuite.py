"""MC-Suite signals (arXiv 2504.05586) computable from the weights or the schema-v1 statistics.

Every signal has a default pruning direction, the paper's where it states one (Table 1, the findings of
Sec. 3.1, the captions of Figs. 8-14; docs/criteria.md lists the source of each): "low" drops the experts
with the smallest signal (the criterion's score is the signal), "high" drops the largest (the score is the
negated signal), so the registry keeps its convention higher score = keep. `oriented` flips any criterion
to the other direction (`--drop`). Undefined signals score -inf in both directions.

ECC and ETS are pair rules (Sec. 2.3 2 and 4): from a matrix over expert pairs (co-selection counts,
shared token ids) the pair with the highest (drop "high") or lowest (drop "low") entry is found and its
less-used member (fewer routed tokens) dropped, removed from the matrix, and so on until the keep count
is reached. They are set selectors (`select`); their scores record the elimination order.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from stats_formats import StatsError
from stats_formats.schema import HIST_HALF, HIST_LOG2_RANGE, HIST_STEPS

from surgery.errors import PlanError
from surgery.criteria.base import (
    Criterion, ExpertWeights, Layer, LayerInput, lowest_where, oriented_score, unbiased_variance,
)
from surgery.criteria.reconstruction import _block_of, _blocks
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


def coselect_matrix(layer: Layer) -> np.ndarray:
    """ECC's collaboration matrix (Eq. 8): C_pq = tokens whose top-k holds both p and q."""
    return np.asarray(layer["coselect"], dtype=np.float64)


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


def shared_tokens_matrix(layer: Layer) -> np.ndarray:
    """ETS's token similarity matrix (Sec. 2.3 4): |T_p & T_q|, the token ids routed to both p and q."""
    sets = _token_sets(layer).astype(np.float64)
    return sets @ sets.T


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
    """Activation similarity (Eqs. 10-11): sum_{q != p} <U_p / n_p, U_q / n_q>, the mean cosine over all pairs of
    p's and q's routed outputs (U = sum r f / ||f||); an expert never routed counts 0 for the others and scores -inf."""
    n = _count(layer)
    u = np.asarray(layer["out_unit_sum"], dtype=np.float64)
    mean_unit = np.divide(u, n[:, None], out=np.zeros_like(u), where=n[:, None] > 0)
    sim = mean_unit @ mean_unit.T
    return lowest_where(sim.sum(axis=1) - np.diag(sim), n == 0)


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


# the pair rule of ECC and ETS


def pair_rule_drops(matrix: np.ndarray, usage: np.ndarray, drop: str, num_drop: int,
                    n_group: int | None = None) -> list[int]:
    """Experts in the order MC-Suite's pair rule drops them (Sec. 2.3, ECC and ETS).

    Each step takes, among the pairs p < q of experts still present, the one with the highest (drop "high")
    or lowest (drop "low") matrix entry, the first such pair in (p, q) order on ties, and drops its less-used
    member (smaller usage n; on equal usage the higher id); the dropped expert leaves the matrix. Experts
    never routed (usage 0) are dropped first, highest id first (the paper leaves them undefined). With
    n_group > 1 every contiguous block of E / n_group experts drops the same number: a pair whose less-used
    member's block has dropped its share is skipped.
    """
    num = len(usage)
    blocks = _blocks(num, n_group)
    if num_drop < 0 or num_drop > num or num_drop % len(blocks):
        raise ValueError(f"cannot drop {num_drop} of {num} experts in {len(blocks)} equal groups")
    block_of = _block_of(num, blocks)
    left = np.full(len(blocks), num_drop // len(blocks))
    present = np.ones(num, dtype=bool)
    order: list[int] = []

    def take(i: int) -> None:
        order.append(i)
        present[i] = False
        left[block_of[i]] -= 1

    for i in sorted(np.flatnonzero(usage == 0).tolist(), reverse=True):
        if left[block_of[i]] > 0:
            take(int(i))
    ids = np.arange(num)
    loser = np.where(usage[None, :] <= usage[:, None], ids[None, :], ids[:, None])  # for p < q: q unless n_p < n_q
    upper = np.triu(np.ones((num, num), dtype=bool), k=1)
    key = matrix if drop == "high" else -matrix
    while len(order) < num_drop:
        eligible = upper & present[:, None] & present[None, :] & (left[block_of[loser]] > 0)
        flat = int(np.argmax(np.where(eligible, key, -np.inf)))  # first maximum in row-major (p, q) order
        p, q = divmod(flat, num)
        take(int(loser[p, q]))
    return order


def _pair_inputs(matrix_of, inp: LayerInput) -> tuple[np.ndarray, np.ndarray]:
    if inp.stats is None:
        raise ValueError("this criterion needs a statistics file")
    return matrix_of(inp.stats), _count(inp.stats)


def pair_select(matrix_of, drop: str, inp: LayerInput, num_keep: int, n_group: int | None = None) -> list[int]:
    """The kept experts of the pair rule for a keep count."""
    matrix, usage = _pair_inputs(matrix_of, inp)
    dropped = pair_rule_drops(matrix, usage, drop, inp.num_experts - num_keep, n_group)
    return sorted(set(range(inp.num_experts)) - set(dropped))


def pair_scores(matrix_of, drop: str, inp: LayerInput) -> np.ndarray:
    """The pair rule's elimination order over all experts (no groups): the first dropped scores 0, the last kept E - 1."""
    matrix, usage = _pair_inputs(matrix_of, inp)
    order = pair_rule_drops(matrix, usage, drop, max(inp.num_experts - 1, 0))
    scores = np.full(inp.num_experts, float(len(order)))
    scores[order] = np.arange(len(order), dtype=np.float64)
    return scores


# name: (signal, what it reads, default drop, formula); "pairs" = a pair matrix for the pair rule. The bracket
# names the default direction's source in the paper (docs/criteria.md); "ours" where the paper states none.
SIGNALS = {
    "mcs-ewn": (weight_norm, "weights", "low",
                f"{WEIGHT_NORM_FORMULA}  [MC-Suite EWN Eq. 6; drop low: ours, the paper states no best]"),
    "mcs-wsr": (wsr, "weights", "high",
                "mean over gate, up, down of ||W||_F^2 / ||W||_2^2  [stable rank WSR Eq. 5; drop high: finding 4 of "
                "Sec. 3.1, dominant experts have lower stable rank]"),
    "mcs-ews": (ews, "weights", "high",
                "-mean_{j!=i} cos(w_i, w_j), w = flat gate|up|down (the paper's sum, divided by E-1)  [EWS Eq. 3; "
                "drop high = most redundant: ours, the paper states no best]"),
    "mcs-rwn": (rwn, "router", "high",
                "||W_router[i, :]||_2, the expert's router row  [MC-Suite RWN Eq. 4; drop high: Max-RWN, Table 1]"),
    "mcs-euf": (euf, "stats", "low", "n_i / N  [EUF Eq. 7; drop low: Fig. 9]"),
    "mcs-ecc": (coselect_matrix, "pairs", "high",
                "pair rule on C_pq = sum_t r_p r_q: drop the less-used (smaller n) of the pair with the highest C "
                "among remaining experts, repeat; score = elimination order; n=0 first  [ECC Eq. 8; drop high: "
                "Fig. 10; --drop low = lowest pair]"),
    "mcs-evtc": (evtc, "stats", "low",
                 "|T_i| / |union_j T_j|, T_i = token ids routed to i at least once  [EVTC Eq. 9 (over ids seen, "
                 "not |V|: same order); drop low: Fig. 8, finding 3]"),
    "mcs-ets": (shared_tokens_matrix, "pairs", "high",
                "pair rule on |T_p & T_q|, T = distinct token ids routed to the expert: drop the less-used (smaller "
                "n) of the pair sharing the most ids, repeat; score = elimination order; n=0 first  [ETS Sec. 2.3 "
                "4; drop high: Max-ETS, Table 1; --drop low = lowest pair]"),
    "mcs-ean": (ean, "stats", "low",
                "sum_c sqrt(Q_ic)  [MC-Suite EAN Eq. 13, not REAP's ean; drop low: Min-EAN, Table 1]"),
    "mcs-eae": (eae, "stats", "low",
                "1/2 sum_c log(v_ic + 1e-12), v_ic = (Q_ic - S_ic^2/n_i)/(n_i - 1)  [EAE Eq. 12; drop low: Fig. 13; "
                "n_i<=1 -> -inf]"),
    "mcs-eas": (eas, "stats", "high",
                "-sum_{j!=i} <U_i/n_i, U_j/n_j>, U = sum r f/||f|| (mean pairwise cosine of routed outputs)  [EAS "
                "Eqs. 10-11; drop high: Fig. 12; n_i=0 -> -inf]"),
    "mcs-eao": (eao, "stats", "low",
                "#{routed f_ic outside mu_i +- 3 sigma_i}, mu, sigma over all n_i*H values; estimated from out_hist "
                "(eighth-octave bins, slope-corrected; ~0.3%/layer, ~3%/expert off)  [EAO Sec. 2.4 3; drop low: "
                "ours, the paper states no best; n_i=0 -> -inf]"),
}


def _pair_criterion(name: str, matrix_of, drop: str, formula: str) -> Criterion:
    """A pair-rule criterion dropping `drop`; `--drop` rebuilds it for the other direction (`directed`)."""
    return Criterion(name, formula, "stats", partial(pair_scores, matrix_of, drop),
                     select=partial(pair_select, matrix_of, drop), drop=drop,
                     directed=partial(_pair_criterion, name, matrix_of, formula=formula))


def mcsuite_criteria() -> list[Criterion]:
    """The router is read with the experts' weights (--model), so router signals need "weights"."""
    out = []
    for name, (fn, reads, drop, formula) in SIGNALS.items():
        if reads == "pairs":
            out.append(_pair_criterion(name, fn, drop, formula))
        else:
            needs = "weights" if reads == "router" else reads
            out.append(Criterion(name, formula, needs, oriented_score(fn, reads, drop), drop=drop))
    return out
