"""The unified family S_i(m, a, b) = M_g[a, b, i] / n_i^m (arXiv 2606.15716) and its named presets.

m = 0 sums over routed tokens (keeps routing frequency); m = 1 averages over them (removes it).
"""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import Layer, lowest_where

PRESETS: dict[str, tuple[int, int, int]] = {
    "frequency": (0, 0, 0),
    "soft_frequency": (0, 1, 0),
    "ean": (0, 0, 1),
    "gated_ean": (0, 1, 1),
    "gated_sq": (0, 2, 2),
    "reap": (1, 1, 1),
    "man": (1, 0, 1),
    "msan": (1, 0, 2),
}

_SYMBOLS = {0: "", 1: " g", 2: " g^2"}
_NORMS = {0: "", 1: " ||f||", 2: " ||f||^2"}


def unified(layer: Layer, m: int, a: int, b: int) -> np.ndarray:
    """S_i(m, a, b); for m = 1, experts never routed (n_i = 0) score -inf."""
    total = np.asarray(layer["moment_g"], dtype=np.float64)[a, b]
    if m == 0:
        return total.copy()
    n = np.asarray(layer["count"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return lowest_where(total / n**m, n == 0)


def formula(m: int, a: int, b: int) -> str:
    """One-line formula of a family member, e.g. '(1/n) sum r g ||f||  [M_g[1,1]/n]'."""
    body = f"sum r{_SYMBOLS[a]}{_NORMS[b]}" if (a, b) != (0, 0) else "n_i = sum r"
    prefix = "(1/n) " if m == 1 else ""
    mean_note = "; n_i=0 -> -inf" if m == 1 else ""
    return f"{prefix}{body}  [M_g[{a},{b}]{'/n' if m == 1 else ''}{mean_note}]"
