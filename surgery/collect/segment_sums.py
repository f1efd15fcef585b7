"""Per-expert sums over assignments sorted by expert, in one pass over the rows (Triton, on GPUs).

For a matrix V [A, D] whose rows are grouped by expert (offsets [E + 1]) and row weights a, b [A],
one kernel returns, per expert e and column d:
  S0 = Σ v,  S1 = Σ v²,  S2 = Σ a·v,  S3 = Σ b·v²   (float32 partial sums).
The torch fallback (one-hot GEMMs) reads V once per sum and materialises float32 copies; this
reads V once, in its own dtype, which is what makes statistics collection nearly as fast as
the forward pass on a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _sums_kernel(V, A, B, OFFS, S0, S1, S2, S3, D, ED, stride_v, SPLIT,
                     DO0: tl.constexpr, DO2: tl.constexpr, DO3: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        part = tl.program_id(2)  # this program's share of the expert's rows
        cmask = cols < D
        first = tl.load(OFFS + e)
        last = tl.load(OFFS + e + 1)
        share = tl.cdiv(tl.cdiv(last - first, SPLIT), BLOCK_R) * BLOCK_R
        start = tl.minimum(first + part * share, last)
        end = tl.minimum(start + share, last)
        # 2-D accumulators, reduced over rows once at the end: a reduction per tile would need a
        # cross-warp exchange through shared memory on every iteration
        s0 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        s3 = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < end
            v = tl.load(V + rows[:, None].to(tl.int64) * stride_v + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            v2 = v * v
            s1 += v2
            if DO0:
                s0 += v
            if DO2:
                a = tl.load(A + rows, mask=rmask, other=0.0).to(tl.float32)
                s2 += v * a[:, None]
            if DO3:
                b = tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
                s3 += v2 * b[:, None]
        out = part * ED + e * D + cols
        tl.store(S1 + out, tl.sum(s1, 0), mask=cmask)
        if DO0:
            tl.store(S0 + out, tl.sum(s0, 0), mask=cmask)
        if DO2:
            tl.store(S2 + out, tl.sum(s2, 0), mask=cmask)
        if DO3:
            tl.store(S3 + out, tl.sum(s3, 0), mask=cmask)


ROWS_PER_PROGRAM = 256  # about this many rows per program: enough programs to fill the GPU when experts are few
TILE = {"BLOCK_D": 128, "BLOCK_R": 16, "num_warps": 4}  # 16 fp32 per thread per accumulator


def segment_sums(v: torch.Tensor, counts: torch.Tensor, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, with_sum: bool = False, tile: dict | None = None) -> dict[str, torch.Tensor]:
    """{"sum", "sq", "a", "b"} per expert ([E, D] float32) for rows of v sorted by expert.

    Each expert's rows are split into shares (how many follows from the row count the host already
    knows, so nothing waits on the GPU); the per-share partial sums are added afterwards, in a fixed
    order. `tile` overrides the block shape (the GPU benchmark compares a few).
    """
    v = v.contiguous()
    num_experts, d = counts.numel(), v.shape[1]
    split = max(1, min(64, v.shape[0] // (num_experts * ROWS_PER_PROGRAM)))
    offs = torch.zeros(num_experts + 1, dtype=torch.int64, device=v.device)
    offs[1:] = torch.cumsum(counts, 0)
    parts = {k: torch.empty(split, num_experts, d, dtype=torch.float32, device=v.device) for k in ("sum", "sq", "a", "b")}
    dummy = parts["sq"]
    tile = tile or TILE
    grid = (num_experts, triton.cdiv(d, tile["BLOCK_D"]), split)
    _sums_kernel[grid](
        v, a if a is not None else dummy, b if b is not None else dummy, offs,
        parts["sum"], parts["sq"], parts["a"], parts["b"], d, num_experts * d, v.stride(0), split,
        DO0=with_sum, DO2=a is not None, DO3=b is not None, **tile,
    )
    done = ["sq", *(["sum"] if with_sum else []), *(["a"] if a is not None else []), *(["b"] if b is not None else [])]
    return {k: parts[k].sum(0) if split > 1 else parts[k][0] for k in done}
