"""Float64 running sums of every schema field for one MoE layer (see stats_formats.schema)."""

from __future__ import annotations

import torch

from stats_formats.schema import FIELDS, HOLDOUT_FIELDS

GRAM_CHUNK = 1024


class LayerAccumulator:
    """Sums for one layer; `update` takes what the experts module saw and what each expert produced."""

    def __init__(self, num_experts: int, hidden: int, inter: int, device: torch.device | str, fields=None):
        self.E, self.H, self.I = num_experts, hidden, inter
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
            self.sums["prob_sum"] += probs.double().sum(0)

    def add_expert(self, e: int, x: torch.Tensor, g: torch.Tensor, p: torch.Tensor | None,
                   h: torch.Tensor | None, f: torch.Tensor) -> None:
        """Tokens routed to expert e: inputs x [n, H], gates g [n], router probs p [n], h [n, I], f [n, H]."""
        s = self.sums
        f64 = f.double()
        g64 = g.double()
        norm = f64.norm(dim=-1)
        s["count"][e] += g64.numel()
        powers_n = torch.stack([torch.ones_like(norm), norm, norm * norm])  # [3, n]
        gp = torch.stack([torch.ones_like(g64), g64, g64 * g64])  # [3, n]
        s["moment_g"][:, :, e] += gp @ powers_n.T
        if not self.has("out_sum"):
            return
        p64 = p.double()
        pp = torch.stack([torch.ones_like(p64), p64, p64 * p64])
        s["moment_p"][:, :, e] += pp @ powers_n.T
        s["out_sum"][e] += f64.sum(0)
        s["out_sq_sum"][e] += (f64 * f64).sum(0)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        s["out_unit_sum"][e] += (f64 / safe[:, None]).sum(0)
        if norm.numel():
            s["out_norm_max"][e] = torch.maximum(s["out_norm_max"][e], norm.max())
        x64 = x.double()
        x2 = x64 * x64
        g2 = (g64 * g64)[:, None]
        s["in_sq_sum"][e] += x2.sum(0)
        s["in_gsq_sum"][e] += (g2 * x2).sum(0)
        h64 = h.double()
        h2 = h64 * h64
        s["inter_norm_sum"][e] += h64.norm(dim=-1).sum()
        s["inter_sq_sum"][e] += h2.sum(0)
        s["inter_gsq_sum"][e] += (g2 * h2).sum(0)

    def add_pairs(self, idx: torch.Tensor, gates: torch.Tensor, outs: torch.Tensor) -> None:
        """Co-selection and Gram over each token's selected experts: ids [T, k], gates [T, k], outputs f [T, k, H]."""
        valid = (idx < self.E).double()
        idx = idx.clamp(max=self.E - 1)
        rows = idx[:, :, None].expand(-1, -1, idx.shape[1])
        cols = idx[:, None, :].expand(-1, idx.shape[1], -1)
        vv = valid[:, :, None] * valid[:, None, :]
        if self.has("coselect"):
            self.sums["coselect"].index_put_((rows.reshape(-1), cols.reshape(-1)), vv.reshape(-1), accumulate=True)
        for start in range(0, idx.shape[0], GRAM_CHUNK):
            y = outs[start:start + GRAM_CHUNK].double() * gates[start:start + GRAM_CHUNK, :, None].double()
            dots = torch.bmm(y, y.transpose(1, 2)) * vv[start:start + GRAM_CHUNK]
            self.sums["gram"].index_put_(
                (rows[start:start + GRAM_CHUNK].reshape(-1), cols[start:start + GRAM_CHUNK].reshape(-1)),
                dots.reshape(-1), accumulate=True,
            )


def holdout_accumulator(num_experts: int, hidden: int, inter: int, device) -> LayerAccumulator:
    return LayerAccumulator(num_experts, hidden, inter, device, fields=list(HOLDOUT_FIELDS))
