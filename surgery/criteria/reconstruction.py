"""Reconstruction view: the layer-output error of dropping a set D of experts, from the Gram matrix.

Without re-routing, dropping D changes the layer output by sum_{i in D} g_i f_i, whose squared
norm summed over tokens is e(D) = sum_{i,j in D} K_ij, K_ij = sum_t r_i r_j g_i g_j <f_i, f_j>.
This is an approximation: in the pruned model the dropped experts' tokens go to their next
choices, which recovers part of the loss, so e(D) overstates the error of experts that have
good substitutes.
"""

from __future__ import annotations

from itertools import combinations, product
from math import comb, prod

import numpy as np

from surgery.criteria.base import LayerInput

EXACT_LIMIT = 20000  # candidate drop sets up to which recon enumerates them all
LOO_FORMULA = "K_ii = sum r g^2 ||f||^2: output error of removing i alone (leave-one-out; equals gated_sq)"
RECON_FORMULA = (
    "keep the set minimising sum_{i,j in D} K_ij over dropped D, assuming no re-routing (dropped experts' "
    "tokens really go to their next choice); exact if C(E,|D|) <= 20000, else greedy + swaps; no --global"
)


def _gram(inp: LayerInput) -> np.ndarray:
    if inp.stats is None:
        raise ValueError("this criterion needs a statistics file")
    return np.asarray(inp.stats["gram"], dtype=np.float64)


def loo(inp: LayerInput) -> np.ndarray:
    """Leave-one-out error K_ii: what removing expert i alone costs the layer output."""
    return np.diag(_gram(inp)).copy()


def drop_error(gram: np.ndarray, dropped: list[int] | np.ndarray) -> float:
    """e(D) = sum_{i,j in D} K_ij."""
    idx = np.asarray(dropped, dtype=np.intp)
    return float(gram[np.ix_(idx, idx)].sum())


def _blocks(num_experts: int, n_group: int | None) -> list[list[int]]:
    groups = n_group if n_group and n_group > 1 else 1
    size = num_experts // groups
    return [list(range(b * size, (b + 1) * size)) for b in range(groups)]


def _block_of(num_experts: int, blocks: list[list[int]]) -> np.ndarray:
    block_of = np.zeros(num_experts, dtype=int)
    for b, ids in enumerate(blocks):
        block_of[ids] = b
    return block_of


def _exact(gram: np.ndarray, blocks: list[list[int]], per_block: int) -> list[int]:
    """Enumerate every drop set with `per_block` experts from each block (lexicographic: first minimum wins)."""
    sets = [sum(choice, ()) for choice in product(*(combinations(b, per_block) for b in blocks))]
    indicator = np.zeros((len(sets), gram.shape[0]))
    for row, chosen in enumerate(sets):
        indicator[row, list(chosen)] = 1.0
    cost = ((indicator @ gram) * indicator).sum(axis=1)
    return list(sets[int(np.argmin(cost))])


def _greedy(gram: np.ndarray, blocks: list[list[int]], per_block: int) -> list[int]:
    """Grow D one expert at a time by the smallest increase 2 sum_{j in D} K_ij + K_ii; returns D in order."""
    diag = np.diag(gram)
    block_of = _block_of(gram.shape[0], blocks)
    left = np.full(len(blocks), per_block)
    pushed = np.zeros(gram.shape[0])  # K @ 1_D
    order: list[int] = []
    for _ in range(per_block * len(blocks)):
        cost = 2 * pushed + diag
        cost[order] = np.inf
        cost[left[block_of] == 0] = np.inf
        i = int(np.argmin(cost))
        order.append(i)
        left[block_of[i]] -= 1
        pushed += gram[:, i]
    return order


def _refine(gram: np.ndarray, blocks: list[list[int]], dropped: list[int]) -> list[int]:
    """Apply the best dropped/kept swap inside one block while it lowers e(D) (a local optimum)."""
    n = gram.shape[0]
    diag = np.diag(gram)
    block_of = _block_of(n, blocks)
    same_block = block_of[:, None] == block_of[None, :]
    tol = 1e-12 * max(float(np.abs(gram).sum()), 1e-300)
    mask = np.zeros(n, dtype=bool)
    mask[dropped] = True
    while True:
        pushed = gram @ mask
        # e(D - i + j) - e(D) for i dropped, j kept
        delta = 2 * (pushed[None, :] - pushed[:, None]) - 2 * gram + diag[None, :] + diag[:, None]
        delta[~(mask[:, None] & ~mask[None, :] & same_block)] = np.inf
        i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if not delta[i, j] < -tol:
            return [int(k) for k in np.flatnonzero(mask)]
        mask[i], mask[j] = False, True


def recon_select(inp: LayerInput, num_keep: int, n_group: int | None = None, exact_limit: int = EXACT_LIMIT) -> list[int]:
    """Kept experts minimising e(D); with n_group, the same number is dropped from every contiguous block."""
    gram = _gram(inp)
    blocks = _blocks(inp.num_experts, n_group)
    num_drop = inp.num_experts - num_keep
    if num_drop < 0 or num_drop % len(blocks):
        raise ValueError(f"cannot keep {num_keep} of {inp.num_experts} experts in {len(blocks)} equal groups")
    per_block = num_drop // len(blocks)
    if prod(comb(len(b), per_block) for b in blocks) <= exact_limit:
        dropped = _exact(gram, blocks, per_block)
    else:
        dropped = _refine(gram, blocks, _greedy(gram, blocks, per_block))
    return sorted(set(range(inp.num_experts)) - set(dropped))


def recon_scores(inp: LayerInput) -> np.ndarray:
    """Greedy elimination order over all experts: the first dropped scores 0, the last E - 1."""
    order = _greedy(_gram(inp), _blocks(inp.num_experts, None), inp.num_experts)
    scores = np.empty(inp.num_experts)
    scores[order] = np.arange(inp.num_experts, dtype=np.float64)
    return scores
