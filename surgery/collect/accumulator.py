"""Float64 running sums of every schema field for one MoE layer (see stats_formats.schema).

One batch is handled at once for all experts: the (token, expert) assignments arrive sorted by
expert, so every per-expert sum is one segmented reduction instead of a Python loop over
experts. Per-batch partial sums use float64 on the CPU and float32 on accelerators (where
float64 is slow), and are added into float64 accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stats_formats.schema import FIELDS, HOLDOUT_FIELDS

CHUNK = 16384  # assignments per reduction step: bounds the temporary [chunk, H] tensors
GRAM_CHUNK = 1024  # tokens per batched k×k Gram product


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

    def _seg(self, values: torch.Tensor, counts: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        kw = {"initial": 0.0} if reduce == "max" else {}
        return torch.segment_reduce(values, reduce, lengths=counts, axis=0, **kw)

    def add_assignments(self, a: Assignments) -> None:
        """Every per-expert field, from assignments sorted by expert."""
        s, cd = self.sums, self.cd
        s["count"] += a.counts.double()
        for start in range(0, a.expert.numel(), CHUNK):
            sl = slice(start, start + CHUNK)
            e = a.expert[sl]
            counts = torch.bincount(e, minlength=self.E)
            f = a.f[sl].to(cd)
            g = a.g[sl].to(cd)
            norm = f.norm(dim=-1)
            ones = torch.ones_like(g)
            powers_n = torch.stack([ones, norm, norm * norm])  # [3, A]
            gp = torch.stack([ones, g, g * g])
            s["moment_g"] += self._seg((gp[:, None] * powers_n[None]).permute(2, 0, 1).contiguous(), counts).permute(1, 2, 0).double()
            if not self.has("out_sum"):
                continue
            p = a.p[sl].to(cd)
            pp = torch.stack([ones, p, p * p])
            s["moment_p"] += self._seg((pp[:, None] * powers_n[None]).permute(2, 0, 1).contiguous(), counts).permute(1, 2, 0).double()
            s["out_sum"] += self._seg(f, counts).double()
            s["out_sq_sum"] += self._seg(f * f, counts).double()
            safe = torch.where(norm > 0, norm, ones)
            s["out_unit_sum"] += self._seg(f / safe[:, None], counts).double()
            s["out_norm_max"] = torch.maximum(s["out_norm_max"], self._seg(norm, counts, "max").double())
            g2 = (g * g)[:, None]
            x = a.x[sl].to(cd)
            x2 = x * x
            s["in_sq_sum"] += self._seg(x2, counts).double()
            s["in_gsq_sum"] += self._seg(g2 * x2, counts).double()
            h = a.h[sl].to(cd)
            h2 = h * h
            s["inter_norm_sum"] += self._seg(h.norm(dim=-1), counts).double()
            s["inter_sq_sum"] += self._seg(h2, counts).double()
            s["inter_gsq_sum"] += self._seg(g2 * h2, counts).double()

    def add_pairs(self, idx: torch.Tensor, gates: torch.Tensor, outs: torch.Tensor) -> None:
        """Co-selection and Gram over each token's selected experts: ids [T, k], gates [T, k], outputs f [T, k, H]."""
        valid = (idx < self.E).to(self.cd)
        idx = idx.clamp(max=self.E - 1)
        k = idx.shape[1]
        rows = idx[:, :, None].expand(-1, -1, k)
        cols = idx[:, None, :].expand(-1, k, -1)
        vv = valid[:, :, None] * valid[:, None, :]
        if self.has("coselect"):
            self.sums["coselect"].index_put_((rows.reshape(-1), cols.reshape(-1)), vv.reshape(-1).double(), accumulate=True)
        for start in range(0, idx.shape[0], GRAM_CHUNK):
            sl = slice(start, start + GRAM_CHUNK)
            y = outs[sl].to(self.cd) * gates[sl, :, None].to(self.cd)
            dots = torch.bmm(y, y.transpose(1, 2)) * vv[sl]
            self.sums["gram"].index_put_((rows[sl].reshape(-1), cols[sl].reshape(-1)), dots.reshape(-1).double(),
                                         accumulate=True)


def holdout_accumulator(num_experts: int, hidden: int, inter: int, device) -> LayerAccumulator:
    return LayerAccumulator(num_experts, hidden, inter, device, fields=list(HOLDOUT_FIELDS))
