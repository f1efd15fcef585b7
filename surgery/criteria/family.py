"""The unified family S_i(m, a, b) = M_g[a, b, i] / n_i^m (arXiv 2606.15716) and its named presets.

m = 0 sums over routed tokens (keeps routing frequency); m = 1 averages over them (removes it).
Besides the presets, any member `family:M,A,B` (M a real >= 0, A and B in {0, 1, 2}: the stored moments)
is a criterion, e.g. `family:1,1,1` = reap, `family:0.5,1,1` between gated_ean and reap.
"""

from __future__ import annotations

import numpy as np

from surgery.criteria.base import Layer, lowest_where
from surgery.errors import PlanError

FAMILY_PREFIX = "family:"
FAMILY_SYNTAX = "family:M,A,B (M a real >= 0, A and B in 0, 1, 2)"

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


def unified(layer: Layer, m: float, a: int, b: int) -> np.ndarray:
    """S_i(m, a, b); for m > 0, experts never routed (n_i = 0) score -inf."""
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


def parse_family(name: str) -> tuple[float, int, int]:
    """(M, A, B) of a `family:M,A,B` name; a PlanError naming the syntax for anything else."""
    body = name[len(FAMILY_PREFIX):] if name.startswith(FAMILY_PREFIX) else None
    parts = body.split(",") if body is not None else []
    try:
        if len(parts) != 3:
            raise ValueError
        m, a, b = float(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise PlanError(f"criterion {name!r} is not {FAMILY_SYNTAX}") from None
    if not (np.isfinite(m) and m >= 0) or a not in (0, 1, 2) or b not in (0, 1, 2):
        raise PlanError(f"criterion {name!r} is not {FAMILY_SYNTAX}")
    return m, a, b


def family_name(m: float, a: int, b: int) -> str:
    """The canonical name of a family member, e.g. 'family:1,1,1'."""
    return f"{FAMILY_PREFIX}{m:g},{a},{b}"


def free_formula(m: float, a: int, b: int) -> str:
    """One-line formula of any member, e.g. '(1/n^0.5) sum r g ||f||  [M_g[1,1]/n^0.5; n_i=0 -> -inf]'."""
    if m in (0, 1):
        text = formula(int(m), a, b)
    else:
        body = f"sum r{_SYMBOLS[a]}{_NORMS[b]}" if (a, b) != (0, 0) else "n_i = sum r"
        text = f"(1/n^{m:g}) {body}  [M_g[{a},{b}]/n^{m:g}; n_i=0 -> -inf]"
    presets = [name for name, mab in PRESETS.items() if mab == (m, a, b)]
    return text + (f"  (= {presets[0]})" if presets else "")
