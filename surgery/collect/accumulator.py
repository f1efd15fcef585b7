"""Float64 running sums of every schema field for one MoE layer (see stats_formats.schema).

One batch is handled at once for all experts: every per-expert sum over the (token, expert)
assignments is one product with the assignments' one-hot expert matrix (a GEMM, fast on
accelerators) instead of a Python loop over experts. Per-batch partial sums use float64 on the CPU and float32 on accelerators (where
float64 is slow), and are added into float64 accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stats_formats.schema import FIELDS, HOLDOUT_FIELDS

from . import segment_sums

CHUNK = 8192  # assignments per reduction step: bounds the temporary [chunk, H] tensors
GRAM_CHUNK = 2048  # tokens per batched k×k Gram product


@dataclass
class Assignments:
    """One batch's (token, expert) pairs, sorted by expert id."""

    expert: torch.Tensor  # [A] expert id
    counts: torch.Tensor  # [E] assignments per expert
    x: torch.Tensor  # [A, H] expert input
    g: torch.Tensor  # [A] applied gate weight
    p: torch.Tensor | None  # [A] router probability (None for held-out sums)
    h: torch.Tensor  # [A, I] intermediate activation
    f: torch.Tensor  # [A, H] expert output


class LayerAccumulator:
    """Sums for one layer."""

    def __init__(self, num_experts: int, hidden: int, inter: int, device: torch.device | str, fields=None):
        self.E, self.H, self.I = num_experts, hidden, inter
        self.device = torch.device(device)
        self.cd = torch.float64 if self.device.type == "cpu" else torch.float32
        dims = {"E": num_experts, "H": hidden, "I": inter}
        names = fields or [f.name for f in FIELDS]
        self.sums: dict[str, torch.Tensor] = {}
        for f in FIELDS:
            if f.name in names:
                shape = tuple(int(s) if s.isdigit() else dims[s] for s in f.shape.split(","))
                self.sums[f.name] = torch.zeros(shape, dtype=torch.float64, device=device)

    def has(self, name: str) -> bool:
        return name in self.sums

    def add_tokens(self, probs: torch.Tensor | None, n_tokens: int) -> None:
        self.sums["tokens"] += n_tokens
        if probs is not None and self.has("prob_sum"):
            self.sums["prob_sum"] += probs.to(self.cd).sum(0).double()


    def add_assignments(self, a: Assignments) -> None:
        """Every per-expert field, from assignments sorted by expert."""
        if self.has("out_sum") and segment_sums.available(self.device):
            self._add_fused(a)
            return
        s, cd = self.sums, self.cd
        s["count"] += a.counts.double()
        for start in range(0, a.expert.numel(), CHUNK):
            sl = slice(start, start + CHUNK)
            e = a.expert[sl]
            onehot = torch.nn.functional.one_hot(e, self.E).T.to(cd)  # [E, A]
            seg = lambda v: (onehot @ v).double()  # noqa: E731 - per-expert sums of rows of v
            f = a.f[sl].to(cd)
            g = a.g[sl].to(cd)
            norm = f.norm(dim=-1)
            ones = torch.ones_like(g)
            powers_n = torch.stack([ones, norm, norm * norm], 1)  # [A, 3]
            gp = torch.stack([ones, g, g * g], 1)
            s["moment_g"] += seg((gp[:, :, None] * powers_n[:, None, :]).reshape(-1, 9)).T.reshape(3, 3, self.E)
            if not self.has("out_sum"):
                continue
            p = a.p[sl].to(cd)
            pp = torch.stack([ones, p, p * p], 1)
            s["moment_p"] += seg((pp[:, :, None] * powers_n[:, None, :]).reshape(-1, 9)).T.reshape(3, 3, self.E)
            safe = torch.where(norm > 0, norm, ones)
            s["out_sum"] += seg(f)
            s["out_sq_sum"] += seg(f * f)
            s["out_unit_sum"] += seg(f / safe[:, None])
            peak = torch.zeros(self.E, dtype=cd, device=norm.device).scatter_reduce_(0, e, norm, "amax")
            s["out_norm_max"] = torch.maximum(s["out_norm_max"], peak.double())
            del f
            g2 = (g * g)[:, None]
            x2 = a.x[sl].to(cd).square_()  # in place: the gathered inputs are not used after this
            s["in_sq_sum"] += seg(x2)
            s["in_gsq_sum"] += seg(x2.mul_(g2))
            del x2
            h = a.h[sl].to(cd)
            s["inter_norm_sum"] += seg(h.norm(dim=-1)[:, None])[:, 0]
            h2 = h.square_()
            s["inter_sq_sum"] += seg(h2)
            s["inter_gsq_sum"] += seg(h2.mul_(g2))

    def _add_fused(self, a: Assignments) -> None:
        """The GPU path: vector fields in one Triton pass per matrix, scalar fields by one small GEMM."""
        s = self.sums
        s["count"] += a.counts.double()
        f32 = torch.float32
        norm = torch.linalg.vector_norm(a.f, dim=-1, dtype=f32)
        g, p = a.g.to(f32), a.p.to(f32)
        g2 = g * g
        inv = 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm))
        fo = segment_sums.segment_sums(a.f, a.counts, a=inv, with_sum=True)
        xo = segment_sums.segment_sums(a.x, a.counts, b=g2)
        ho = segment_sums.segment_sums(a.h, a.counts, b=g2)
        s["out_sum"] += fo["sum"].double()
        s["out_sq_sum"] += fo["sq"].double()
        s["out_unit_sum"] += fo["a"].double()
        s["in_sq_sum"] += xo["sq"].double()
        s["in_gsq_sum"] += xo["b"].double()
        s["inter_sq_sum"] += ho["sq"].double()
        s["inter_gsq_sum"] += ho["b"].double()
        ones = torch.ones_like(g)
        powers_n = torch.stack([ones, norm, norm * norm], 1)
        gp = torch.stack([ones, g, g2], 1)
        pp = torch.stack([ones, p, p * p], 1)
        scalars = torch.cat([(gp[:, :, None] * powers_n[:, None, :]).reshape(-1, 9),
                             (pp[:, :, None] * powers_n[:, None, :]).reshape(-1, 9),
                             torch.linalg.vector_norm(a.h, dim=-1, dtype=f32)[:, None]], 1)  # [A, 19]
        onehot = torch.nn.functional.one_hot(a.expert, self.E).T.to(f32)
        sums = (onehot @ scalars).double()  # [E, 19]
        s["moment_g"] += sums[:, :9].T.reshape(3, 3, self.E)
        s["moment_p"] += sums[:, 9:18].T.reshape(3, 3, self.E)
        s["inter_norm_sum"] += sums[:, 18]
        peak = torch.zeros(self.E, dtype=f32, device=norm.device).scatter_reduce_(0, a.expert, norm, "amax")
        s["out_norm_max"] = torch.maximum(s["out_norm_max"], peak.double())

    def add_pairs(self, idx: torch.Tensor, gates: torch.Tensor, outs: torch.Tensor) -> None:
        """Co-selection and Gram over each token's selected experts: ids [T, k], gates [T, k], outputs f [T, k, H].

        With O the tokens' one-hot expert matrix [T, k, E] and D_t = Y_t Y_tᵀ the k×k dot products of
        the gated outputs, K = Σ_t O_tᵀ D_t O_t and C = Σ_t (Σ_k O_t)ᵀ(Σ_k O_t): GEMMs, no scattered atomics.
        """
        cd = self.cd
        valid = (idx < self.E).to(cd)
        onehot = torch.nn.functional.one_hot(idx.clamp(max=self.E - 1), self.E).to(cd) * valid[:, :, None]
        for start in range(0, idx.shape[0], GRAM_CHUNK):
            sl = slice(start, start + GRAM_CHUNK)
            o = onehot[sl]
            if self.has("coselect"):
                per_token = o.sum(1)
                self.sums["coselect"] += (per_token.T @ per_token).double()
            dots = _gated_dots(outs[sl], gates[sl].to(cd), cd)
            flat = o.reshape(-1, self.E)
            self.sums["gram"] += (flat.T @ torch.bmm(dots, o).reshape(-1, self.E)).double()


def _gated_dots(outs: torch.Tensor, gates: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """g_i g_j <f_i, f_j> for each token's k selected experts: [T, k, k] in `cd`.

    On CUDA, bf16/fp16 outputs go straight into a GEMM with float32 output (products of
    half-precision values are exact in float32), so no float32 copy of [T, k, H] is made.
    """
    if cd == torch.float32 and outs.is_cuda and outs.dtype in (torch.bfloat16, torch.float16):
        dots = torch.bmm(outs, outs.transpose(1, 2), out_dtype=torch.float32)
    else:
        y = outs.to(cd)
        dots = torch.bmm(y, y.transpose(1, 2))
    return dots * gates[:, :, None] * gates[:, None, :]


def holdout_accumulator(num_experts: int, hidden: int, inter: int, device) -> LayerAccumulator:
    return LayerAccumulator(num_experts, hidden, inter, device, fields=list(HOLDOUT_FIELDS))
