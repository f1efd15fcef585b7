"""MC-Suite signals (arXiv 2504.05586) computable from the weights or the schema-v1 statistics.

Every signal has a default pruning direction: "low" drops the experts with the smallest signal (the
criterion's score is the signal), "high" drops the largest (the score is the negated signal), so the
registry keeps its convention higher score = keep. The paper's best are Min-EAN and Min-EGE; the
similarity signals (EWS, EAS) drop the most redundant experts, i.e. the highest. `oriented` flips any
criterion to the other direction (`--drop`). Undefined signals score -inf in both directions.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..plan import PlanError
from .base import Criterion, ExpertWeights, Layer, LayerInput, from_stats, from_weights, lowest_where
from .weights import MATRICES, _flat

DROPS = ("low", "high")


def negate(scores: np.ndarray) -> np.ndarray:
    """-scores, except that -inf (undefined) stays -inf so such experts still rank last."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(np.isneginf(s), -np.inf, -s)


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


# weights


def ewn(weights: ExpertWeights, num_experts: int) -> np.ndarray:
    """Expert weight norm: Frobenius norm of gate, up and down together."""
    return np.array([np.linalg.norm(_flat(weights, e)) for e in range(num_experts)])


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
    return _mean_cosine_to_others(np.stack([_flat(weights, e) for e in range(num_experts)]))


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


def ean(layer: Layer) -> np.ndarray:
    """MC-Suite EAN: sum_c sqrt(Q_ic)."""
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    return np.sqrt(np.clip(q, 0.0, None)).sum(axis=1)


def eae(layer: Layer) -> np.ndarray:
    """Gaussian entropy proxy 1/2 sum_c log(v_ic + 1e-12), v the unbiased per-channel variance; n_i <= 1 -> -inf."""
    n = _count(layer)
    s = np.asarray(layer["out_sum"], dtype=np.float64)
    q = np.asarray(layer["out_sq_sum"], dtype=np.float64)
    defined = n > 1
    safe = np.where(defined, n, 2.0)[:, None]
    var = np.clip((q - s**2 / safe) / (safe - 1), 0.0, None)  # clip float cancellation below 0
    return lowest_where(0.5 * np.log(var + 1e-12).sum(axis=1), ~defined)


def eas(layer: Layer) -> np.ndarray:
    """Activation similarity: mean cosine between U_i / n_i and every other expert's; never routed -> -inf."""
    n = _count(layer)
    u = np.asarray(layer["out_unit_sum"], dtype=np.float64)
    direction = np.divide(u, n[:, None], out=np.zeros_like(u), where=n[:, None] > 0)
    return lowest_where(_mean_cosine_to_others(direction), n == 0)


# name: (signal, needs, default drop, formula)
SIGNALS = {
    "mcs-ewn": (ewn, "weights", "low", "||[W_gate, W_up, W_down]||_F  [MC-Suite EWN; drop low]"),
    "mcs-wsr": (wsr, "weights", "low",
                "mean over gate, up, down of ||W||_F^2 / ||W||_2^2  [stable rank WSR; drop low]"),
    "mcs-ews": (ews, "weights", "high",
                "-mean_{j!=i} cos(w_i, w_j), w = flat gate|up|down  [EWS similarity; drop high = most redundant]"),
    "mcs-euf": (euf, "stats", "low", "n_i / N  [EUF; drop low]"),
    "mcs-ecc": (ecc, "stats", "low", "sum_{j!=i} C_ij / n_i  [ECC co-selection; drop low; n_i=0 -> -inf]"),
    "mcs-ean": (ean, "stats", "low",
                "sum_c sqrt(Q_ic)  [MC-Suite EAN, not REAP's ean; drop low: paper's best Min-EAN]"),
    "mcs-eae": (eae, "stats", "low",
                "1/2 sum_c log(v_ic + 1e-12), v_ic = (Q_ic - S_ic^2/n_i)/(n_i - 1)  [EAE; drop low; n_i<=1 -> -inf]"),
    "mcs-eas": (eas, "stats", "high",
                "-mean_{j!=i} cos(U_i/n_i, U_j/n_j)  [EAS similarity; drop high = most redundant; n_i=0 -> -inf]"),
}


def _scored(fn, needs: str, drop: str):
    adapt = from_weights if needs == "weights" else from_stats
    raw = adapt(fn)
    if drop == "low":
        return raw
    return lambda inp: negate(raw(inp))


def mcsuite_criteria() -> list[Criterion]:
    return [Criterion(name, formula, needs, _scored(fn, needs, drop))
            for name, (fn, needs, drop, formula) in SIGNALS.items()]


def default_drop(name: str) -> str:
    """The direction a criterion drops by default: "high" for the MC-Suite similarity signals, else "low"."""
    return SIGNALS[name][2] if name in SIGNALS else "low"


def oriented(crit: Criterion, drop: str | None) -> Criterion:
    """The criterion dropping `drop` ("low" / "high" of its signal); None or the default leaves it unchanged.

    Set selectors (recon) and auto choose whole sets, which have no opposite direction: a PlanError.
    """
    if drop is None:
        return crit
    if drop not in DROPS:
        raise PlanError(f"--drop must be one of {DROPS}, not {drop!r}")
    if crit.select is not None or crit.score is None:
        raise PlanError(f"--drop does not apply to {crit.name}: it selects whole expert sets, not a score order")
    if drop == default_drop(crit.name):
        return crit
    score = crit.score

    def flipped(inp: LayerInput) -> np.ndarray:
        return negate(score(inp))

    return replace(crit, score=flipped)
