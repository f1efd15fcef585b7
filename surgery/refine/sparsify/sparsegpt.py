"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774), MoE-Pruner's main baseline, for every expert at once.

Each expert matrix W [out, in] is pruned column by column in blocks of BLOCK with the optimal brain
surgeon update: the error of zeroing or keeping column i is spread over the columns not yet visited
through the inverse Hessian of the expert's routed inputs, H = sum_t r_i x x^T (the paper's H = X X^T
over the expert's own tokens; a scale does not matter, the dampening is relative). As in the
reference implementation (IST-DASLab/sparsegpt): dead inputs (H_jj = 0) are zeroed, H is damped by
1% of its mean diagonal, the Cholesky factor of H^-1 drives the updates, the unstructured mask is
chosen per block of BLOCK columns over all rows by w^2 / [H^-1]_jj^2 (adaptive mask selection), and
N:M prunes the M - N smallest of every M consecutive inputs. All experts of a matrix go through in
one batched pass ([E, out, in] with [E, in, in] Hessians).
"""

from __future__ import annotations

import torch

from surgery.refine.sparsify.masks import SparsifyError, parse_pattern

BLOCK = 128  # the reference implementation's blocksize
DAMP = 0.01  # the reference implementation's percdamp


def _inverse_cholesky(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1 per expert; zeroes `weight`'s dead inputs in place.
    An expert that saw no token (H = 0) gets the identity: pruning by magnitude, no update."""
    h = hessian.clone()
    unseen = (h.diagonal(dim1=-2, dim2=-1) == 0).all(dim=-1)
    h[unseen] = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    weight.masked_fill_(dead[:, None, :], 0.0)
    diag += DAMP * diag.mean(dim=-1, keepdim=True)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError:  # a non-positive Hessian despite dampening
        raise SparsifyError(f"sparsegpt: an expert's input Hessian is not positive definite after {DAMP:.0%} "
                            "dampening; use more calibration text") from None


def _block_mask(w: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True = prune: each expert's block entries whose w^2 / d^2 is at most the int(n * sparsity)-th smallest
    (0-based), as the reference selects them (so one entry more than n * sparsity, ties included)."""
    score = (w * w / (d * d)[:, None, :]).flatten(1)
    if sparsity == 0:
        return torch.zeros_like(w, dtype=torch.bool)
    k = min(int(score.shape[1] * sparsity), score.shape[1] - 1)
    thresh = torch.kthvalue(score, k + 1, dim=1, keepdim=True).values
    return (score <= thresh).view_as(w)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """The pruned and updated weights [E, out, in] (float32) for weights [E, out, in] and Hessians [E, in, in]."""
    nm = parse_pattern(pattern)
    w = weight.detach().float().clone()
    num, rows, cols = w.shape
    if nm is not None and cols % nm[1]:
        raise SparsifyError(f"pattern {pattern}: {cols} inputs are not a multiple of {nm[1]}")
    hinv = _inverse_cholesky(hessian.float(), w)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1, h1 = w[:, :, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        d1 = h1.diagonal(dim1=-2, dim2=-1)
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask1 = _block_mask(w1, d1, sparsity) if nm is None else torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = w1[:, :, i:i + nm[1]] ** 2 / (d1[:, None, i:i + nm[1]] ** 2)
                lowest = torch.topk(score, nm[1] - nm[0], dim=-1, largest=False).indices
                mask1[:, :, i:i + nm[1]].scatter_(-1, lowest, True)
            col = w1[:, :, i]
            q = col.masked_fill(mask1[:, :, i], 0.0)
            q1[:, :, i] = q
            err = (col - q) / d1[:, None, i]
            w1[:, :, i:] -= err[:, :, None] * h1[:, None, i, i:]
            err1[:, :, i] = err
        w[:, :, i1:i2] = q1
        w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return w
