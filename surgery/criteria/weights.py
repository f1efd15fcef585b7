"""Calibration-free criteria computed from the experts' weight matrices alone."""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import ExpertWeights

MATRICES = ("gate", "up", "down")
WEIGHT_NORM_FORMULA = "||[W_gate, W_up, W_down]||_F"
AIMER_FORMULA = "-(mean|w| / RMS(w)) over the expert's weights (AIMER, arXiv 2603.18492: highest AIMER pruned)"


def flattened(weights: ExpertWeights, expert: int) -> np.ndarray:
    """gate | up | down of one expert, flattened and concatenated, in float64."""
    mats = weights(expert)
    return np.concatenate([np.asarray(mats[k], dtype=np.float64).ravel() for k in MATRICES])


def weight_norm(weights: ExpertWeights, num_experts: int) -> np.ndarray:
    """Frobenius norm of all three matrices: small experts change the output least (also MC-Suite's EWN)."""
    return np.array([np.linalg.norm(flattened(weights, e)) for e in range(num_experts)])


def aimer(weights: ExpertWeights, num_experts: int) -> np.ndarray:
    """Negated AIMER: a high mean|w|/RMS ratio means flat, low-information weights, pruned first.

    An all-zero expert (ratio undefined) contributes nothing and scores -inf.
    """
    out = np.empty(num_experts)
    for e in range(num_experts):
        w = flattened(weights, e)
        rms = np.sqrt(np.mean(w**2))
        out[e] = -np.mean(np.abs(w)) / rms if rms > 0 else -np.inf
    return out
