"""Merged expert weights: each group of experts (surgery.rewrite.merge_groups) becomes one expert.

- `hc-smoe`: the members' matrices averaged with their routing frequencies as weights (HC-SMoE's "freq");
- `mc-smoe`: every member's intermediate neurons first permuted onto the representative's (weight
  matching: the assignment maximising the summed dot products of the neurons' gate row, up row and down
  column, MC-SMoE's permutation alignment), then the frequency-weighted average;
- `lsq` (ours): aligned as mc-smoe, then each column chosen by least squares to reproduce every member's
  gated contribution on its own routed tokens, min_W sum_i sum_t r_i g_i^2 ||(W - W_i) x||^2, with the
  statistics file's diagonal second moments (`in_gsq_sum` for gate/up columns, `inter_gsq_sum` for the
  down columns, permuted with the neurons): W[:, c] = sum_i D_i[c] W_i[:, c] / sum_i D_i[c].

Averages are written rep + sum_i w_i (W_i - rep) / sum_i w_i, so a group of identical experts gives the
representative's matrices exactly, and a group of one is the expert itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from surgery.errors import UserError

METHODS = ("hc-smoe", "mc-smoe", "lsq")
Matrices = dict[str, np.ndarray]  # {"gate": [I, H], "up": [I, H], "down": [H, I]}


class MergeError(UserError):
    """A merge cannot be done with what was given (method, statistics, dependency)."""


def align(rep: Matrices, member: Matrices) -> np.ndarray:
    """perm with member neuron perm[j] matched to the representative's neuron j (weight matching)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise MergeError("prune --merge mc-smoe / lsq needs scipy: pip install 'moe-surgery[merge]'") from None
    a = np.concatenate([rep["gate"], rep["up"], rep["down"].T], axis=1).astype(np.float64)
    b = np.concatenate([member["gate"], member["up"], member["down"].T], axis=1).astype(np.float64)
    rows, cols = linear_sum_assignment(a @ b.T, maximize=True)
    return cols[np.argsort(rows)]


def permute(m: Matrices, perm: np.ndarray) -> Matrices:
    return {"gate": m["gate"][perm], "up": m["up"][perm], "down": m["down"][:, perm]}


def _weighted(rep: np.ndarray, members: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """rep + sum_i w_i (W_i - rep) / sum_i w_i, with `w` [n] or per column [n, columns]."""
    total = w.sum(0)
    acc = np.zeros(rep.shape, dtype=np.float64)
    for wi, m in zip(w, members):
        acc += wi * (m.astype(np.float64) - rep)
    return rep + acc / total


def _frequency_weights(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    return freq if freq.sum() > 0 else np.ones_like(freq)


def _column_weights(d: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Per-column least-squares weights [n, C]; a column no member's tokens reach falls back to frequencies."""
    d = np.asarray(d, dtype=np.float64)
    empty = d.sum(0) <= 0
    if empty.any():
        d = d.copy()
        d[:, empty] = _frequency_weights(freq)[:, None]
    return d


def merge_group(method: str, mats: list[Matrices], freq: np.ndarray, in_gsq: np.ndarray | None = None,
                inter_gsq: np.ndarray | None = None) -> Matrices:
    """One merged expert from its group's matrices (representative first) and per-member statistics:
    `freq` [n] routed tokens; for lsq `in_gsq` [n, H] and `inter_gsq` [n, I] (the statistics' sums)."""
    if method not in METHODS:
        raise MergeError(f"--merge {method!r}: choose one of {', '.join(METHODS)}")
    rep = {k: v.astype(np.float64) for k, v in mats[0].items()}
    if len(mats) == 1:
        return rep
    members = list(mats)
    inter = None if inter_gsq is None else np.array(inter_gsq, dtype=np.float64)
    if method != "hc-smoe":
        for i in range(1, len(members)):
            perm = align(rep, members[i])
            members[i] = permute(members[i], perm)
            if inter is not None:
                inter[i] = inter[i][perm]
    if method == "lsq":
        w_in = _column_weights(in_gsq, freq)[:, None, :]
        w_down = _column_weights(inter, freq)[:, None, :]
        weights = {"gate": w_in, "up": w_in, "down": w_down}
    else:
        w = _frequency_weights(freq)[:, None, None]
        weights = {"gate": w, "up": w, "down": w}
    return {role: _weighted(rep[role], [m[role] for m in members], weights[role]) for role in rep}


def merge_layer(method: str, groups: list[list[int]], read: Callable[[int], Matrices],
                field: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(gate_up [k, 2I, H], down [k, H, I]) for one layer in transformers' in-memory layout (gate rows, then
    up rows). `read(e)` gives an original expert's matrices, `field(name)` a statistics field [E, ...]."""
    count = field("count")
    in_gsq = field("in_gsq_sum") if method == "lsq" else None
    inter_gsq = field("inter_gsq_sum") if method == "lsq" else None
    gate_up, down = [], []
    for g in groups:
        merged = merge_group(method, [read(e) for e in g], count[g],
                             None if in_gsq is None else in_gsq[g], None if inter_gsq is None else inter_gsq[g])
        gate_up.append(np.concatenate([merged["gate"], merged["up"]], axis=0))
        down.append(merged["down"])
    return np.stack(gate_up), np.stack(down)


def merge_record(method: str, groups: dict[int, list[list[int]]]) -> dict:
    """pruning.json's `merge` record: the method, how router rows were formed, and per layer which original
    experts each new expert stands for (new expert i = groups[layer][i]; its first id gave the router row)."""
    return {
        "method": method,
        "weights": {"hc-smoe": "frequency-weighted average",
                    "mc-smoe": "neurons permuted onto the representative's (weight matching), then frequency-"
                               "weighted average",
                    "lsq": "neurons permuted onto the representative's, then per-column least squares with the "
                           "statistics' diagonal routed second moments (in_gsq_sum, inter_gsq_sum)"}[method],
        "router_rows": "the representative's row (the first id of each group), unchanged",
        "groups": {str(layer): gs for layer, gs in sorted(groups.items())},
    }
