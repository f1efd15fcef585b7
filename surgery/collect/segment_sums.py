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
    def _sums_kernel(V, A, B, OFFS, S0, S1, S2, S3, D, stride_v,
                     DO0: tl.constexpr, DO2: tl.constexpr, DO3: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        start = tl.load(OFFS + e)
        end = tl.load(OFFS + e + 1)
        s0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        s3 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < end
            v = tl.load(V + rows[:, None].to(tl.int64) * stride_v + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            v2 = v * v
            s1 += tl.sum(v2, 0)
            if DO0:
                s0 += tl.sum(v, 0)
            if DO2:
                a = tl.load(A + rows, mask=rmask, other=0.0).to(tl.float32)
                s2 += tl.sum(v * a[:, None], 0)
            if DO3:
                b = tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
                s3 += tl.sum(v2 * b[:, None], 0)
        out = e * D + cols
        tl.store(S1 + out, s1, mask=cmask)
        if DO0:
            tl.store(S0 + out, s0, mask=cmask)
        if DO2:
            tl.store(S2 + out, s2, mask=cmask)
        if DO3:
            tl.store(S3 + out, s3, mask=cmask)


def segment_sums(v: torch.Tensor, counts: torch.Tensor, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, with_sum: bool = False) -> dict[str, torch.Tensor]:
    """{"sum", "sq", "a", "b"} per expert ([E, D] float32) for rows of v sorted by expert."""
    v = v.contiguous()
    num_experts, d = counts.numel(), v.shape[1]
    offs = torch.zeros(num_experts + 1, dtype=torch.int64, device=v.device)
    offs[1:] = torch.cumsum(counts, 0)
    outs = {k: torch.empty(num_experts, d, dtype=torch.float32, device=v.device) for k in ("sum", "sq", "a", "b")}
    dummy = outs["sq"]
    grid = (num_experts, triton.cdiv(d, 128))
    _sums_kernel[grid](
        v, a if a is not None else dummy, b if b is not None else dummy, offs,
        outs["sum"], outs["sq"], outs["a"], outs["b"], d, v.stride(0),
        DO0=with_sum, DO2=a is not None, DO3=b is not None, BLOCK_D=128, BLOCK_R=64, num_warps=8,
    )
    return outs
