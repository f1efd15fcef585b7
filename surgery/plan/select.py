"""Turn per-layer expert rankings into a keep plan: which expert ids each MoE layer keeps.

Ties are broken deterministically: higher score first, then lower expert id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from surgery.criteria.base import Ranker
from surgery.errors import PlanError


def keep_count(num_experts: int, top_k: int, *, ratio: float | None = None, keep: int | None = None) -> int:
    """Experts kept per layer: keep, or E - round(ratio * E) with halves rounded up; never below top_k."""
    if (ratio is None) == (keep is None):
        raise PlanError("give exactly one of ratio (fraction of experts removed) and keep (experts kept per layer)")
    if keep is None:
        if not 0 <= ratio < 1:
            raise PlanError(f"ratio {ratio} must be in [0, 1): it is the fraction of experts removed")
        keep = num_experts - math.floor(ratio * num_experts + 0.5)
    if keep > num_experts:
        raise PlanError(f"cannot keep {keep} experts per layer: the model has {num_experts}")
    if keep < top_k:
        max_ratio = (num_experts - top_k) / num_experts
        raise PlanError(
            f"keeping {keep} of {num_experts} experts per layer is below top_k={top_k}: the router picks {top_k} "
            f"experts per token, so keep at least {top_k} (ratio at most {max_ratio:.4g})"
        )
    return keep


def _check_groups(num_experts: int, top_k: int, num_keep: int, groups: int, min_group_size: int) -> None:
    if num_experts % groups:
        raise PlanError(f"{num_experts} experts do not split into n_group={groups} equal blocks")
    if num_keep % groups == 0 and num_keep // groups >= min_group_size:
        return
    valid = [k for k in range(max(top_k, 1), num_experts + 1) if k % groups == 0 and k // groups >= min_group_size]
    raise PlanError(
        f"keeping {num_keep} experts per layer is invalid for a group-limited router (n_group={groups}, at least "
        f"{min_group_size} per group): every group keeps the same number; valid keep counts: {valid}"
    )


def _top(scores: np.ndarray, ids: np.ndarray, count: int) -> list[int]:
    """The `count` best of `ids` by score desc, then id asc."""
    order = np.lexsort((ids, -scores[ids]))
    return [int(i) for i in ids[order[:count]]]


def _validated(layer: int, scores: np.ndarray, num_experts: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (num_experts,):
        raise PlanError(f"layer {layer}: {scores.shape[0] if scores.ndim == 1 else scores.shape} scores for {num_experts} experts")
    if np.isnan(scores).any():
        raise PlanError(f"layer {layer}: scores contain NaN")
    return scores


def _check_selected(layer: int, kept: list[int], num_experts: int, num_keep: int, groups: int) -> list[int]:
    ids = sorted({int(i) for i in kept})
    size = num_experts // groups
    per_group = np.bincount(np.asarray(ids, dtype=int) // size, minlength=groups)
    if len(ids) != num_keep or ids[0] < 0 or ids[-1] >= num_experts or (per_group != num_keep // groups).any():
        raise PlanError(f"layer {layer}: selector returned an invalid keep set {kept}")
    return ids


def _layer_keep(layer: int, ranker: Ranker, num_experts: int, num_keep: int, groups: int) -> list[int]:
    if callable(ranker):
        return _check_selected(layer, ranker(num_keep, groups if groups > 1 else None), num_experts, num_keep, groups)
    scores = _validated(layer, ranker, num_experts)
    size = num_experts // groups
    kept = [e for b in range(groups) for e in _top(scores, np.arange(b * size, (b + 1) * size), num_keep // groups)]
    return sorted(kept)


def normalised(scores: np.ndarray) -> np.ndarray:
    """Share of the layer's total: s / sum|s| over finite scores (unchanged if that sum is 0; -inf stays -inf).

    Shares, unlike ranks, let a layer whose importance is concentrated in few experts give up more experts.
    """
    finite = np.isfinite(scores)
    total = float(np.abs(scores[finite]).sum())
    return scores / total if total > 0 else scores.copy()


def _global_keep(rankers: Mapping[int, Ranker], num_experts: int, top_k: int, num_keep: int) -> dict[int, list[int]]:
    """Drop the L * (E - keep) lowest normalised scores over all layers, keeping >= top_k in every layer."""
    layers = sorted(rankers)
    if any(callable(rankers[l]) for l in layers):
        raise PlanError("this criterion selects a set per layer and has no cross-layer scores: it cannot be used with --global")
    table = np.stack([normalised(_validated(l, rankers[l], num_experts)) for l in layers])
    layer_idx, expert_idx = np.indices(table.shape)
    # importance order: score desc, then layer asc, then expert asc; removal walks it backwards
    order = np.lexsort((expert_idx.ravel(), layer_idx.ravel(), -table.ravel()))[::-1]
    to_remove = len(layers) * (num_experts - num_keep)
    removable = np.full(len(layers), num_experts - top_k)
    removed = np.zeros(table.shape, dtype=bool)
    for flat in order:
        if to_remove == 0:
            break
        li, e = divmod(int(flat), num_experts)
        if removable[li] > 0:
            removed[li, e] = True
            removable[li] -= 1
            to_remove -= 1
    return {l: [int(e) for e in np.flatnonzero(~removed[li])] for li, l in enumerate(layers)}


def make_plan(
    rankers: Mapping[int, Ranker],
    num_experts: int,
    top_k: int,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    global_rank: bool = False,
    groups: int | None = None,
    min_group_size: int = 1,
) -> dict[int, list[int]]:
    """Kept expert ids (ascending) per layer, from scores (higher = keep) or a selector per layer.

    Uniform by default. `global_rank` ranks normalised scores across layers (see `normalised`) and
    gives non-uniform plans with at least top_k experts per layer. `groups` (n_group > 1): experts
    form contiguous blocks of E / n_group ids and every block keeps keep / n_group of its own best.
    """
    num_keep = keep_count(num_experts, top_k, ratio=ratio, keep=keep)
    n_group = groups if groups and groups > 1 else 1
    if global_rank:
        if n_group > 1:
            raise PlanError("--global cannot be combined with group-limited routing: groups must keep equal numbers")
        return _global_keep(rankers, num_experts, top_k, num_keep)
    if n_group > 1:
        _check_groups(num_experts, top_k, num_keep, n_group, min_group_size)
    return {l: _layer_keep(l, rankers[l], num_experts, num_keep, n_group) for l in sorted(rankers)}

