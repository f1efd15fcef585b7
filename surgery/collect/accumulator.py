"""Float64 running sums of every schema field for one MoE layer (see stats_formats.schema).

One batch is handled at once for all experts: every per-expert sum over the (token, expert)
assignments is one product with the assignments' one-hot expert matrix (a GEMM, fast on
accelerators) instead of a Python loop over experts. Per-batch partial sums use float64 on the CPU and float32 on accelerators (where
float64 is slow), and are added into float64 accumulators. The one bit set, `token_bits`, is kept
packed as in the file (uint8, 8 token ids a byte) and or-ed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stats_formats.schema import (
    FIELD_BY_NAME,
    FIELDS,
    HIST_HALF,
    HIST_LOG2_RANGE,
    HIST_STEPS,
    HOLDOUT_FIELDS,
    MCSUITE_FIELDS,
    MERGE_FIELDS,
    field_shape,
)

from surgery.collect import segment_sums

CHUNK = 8192  # assignments per reduction step: bounds the temporary [chunk, H] tensors
GRAM_CHUNK = 8192  # tokens per batched k×k Gram product (a [chunk, k, E] temporary)
HIST_CHUNK = 1024  # assignments per histogram step: bounds the temporary [chunk, H] index tensors


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
    ids: torch.Tensor | None = None  # [A] token id at the assignment's position (None: vocabulary not tracked)


class LayerAccumulator:
    """Sums for one layer: every FIELDS and MC-Suite field, or `fields`.

    `token_bits` needs a `vocab_size`; `out_hist` is opt-in (`histogram`): it bins every routed
    output value, which costs several times the rest of the statistics on a GPU. `merge_stats` adds
    the merging fields (every expert on every token, and the router-logit Gram).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, device: torch.device | str, fields=None,
                 vocab_size: int | None = None, histogram: bool = False, merge_stats: bool = False):
        self.E, self.H, self.I = num_experts, hidden, inter
        self.device = torch.device(device)
        self.cd = torch.float64 if self.device.type == "cpu" else torch.float32
        optional = {"token_bits": bool(vocab_size), "out_hist": histogram,
                    **{f.name: merge_stats for f in MERGE_FIELDS}}
        names = fields or [f.name for f in (*FIELDS, *MCSUITE_FIELDS, *MERGE_FIELDS) if optional.get(f.name, True)]
        self.sums: dict[str, torch.Tensor] = {}
        for name in names:
            dtype = torch.uint8 if FIELD_BY_NAME[name].dtype == "U8" else torch.float64
            shape = field_shape(name, num_experts, hidden, inter, vocab_size or 0)
            self.sums[name] = torch.zeros(shape, dtype=dtype, device=device)

    def has(self, name: str) -> bool:
        return name in self.sums

    def add_tokens(self, probs: torch.Tensor | None, n_tokens: int) -> None:
        self.sums["tokens"] += n_tokens
        if probs is not None and self.has("prob_sum"):
            self.sums["prob_sum"] += probs.to(self.cd).sum(0).double()

    def add_dense(self, dense_sum: torch.Tensor, logits: torch.Tensor) -> None:
        """The merging fields: every expert's outputs summed over all tokens [E, H], and the tokens' router logits [T, E]."""
        self.sums["dense_out_sum"] += dense_sum.double()
        lg = logits.to(self.cd)
        self.sums["logit_gram"] += (lg.T @ lg).double()

    def add_assignments(self, a: Assignments) -> None:
        """Every per-expert field, from assignments sorted by expert."""
        if self.has("out_hist"):
            self._add_histogram(a.f, a.expert)
        if self.has("token_bits"):
            _mark_tokens(self.sums["token_bits"], a.expert, a.ids)
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

    def _add_histogram(self, f: torch.Tensor, expert: torch.Tensor) -> None:
        """out_hist: each output value's unit weight split between its two grid points (continuous in f).

        Each value adds 1 to the count and frac to the fraction sum of its lower point k; weight 1 - frac
        at k and frac at k + 1 is then count(k) - fractions(k) + fractions(k - 1). One spare bin per
        expert takes the (zero) upper weight of s = HIST_HALF, so the shift never crosses into the next expert.
        """
        bins = 2 * HIST_HALF + 2
        counts = torch.zeros(self.E * bins, dtype=self.cd, device=f.device)
        fractions = torch.zeros_like(counts)
        for start in range(0, expert.numel(), HIST_CHUNK):
            v = f[start:start + HIST_CHUNK].to(self.cd)
            magnitude = torch.log2(v.abs()).mul_(HIST_STEPS).add_(HIST_STEPS * HIST_LOG2_RANGE).clamp_(0, HIST_HALF)
            s = torch.copysign(magnitude, v)
            low = s.floor()
            index = low.long().add_(expert[start:start + HIST_CHUNK, None] * bins + HIST_HALF).view(-1)
            counts.index_add_(0, index, counts.new_ones(1).expand(index.numel()))
            fractions.index_add_(0, index, s.sub_(low).view(-1))
        shifted = torch.cat([fractions.new_zeros(1), fractions[:-1]])
        hist = (counts - fractions + shifted).view(self.E, bins)[:, :-1]
        self.sums["out_hist"] += hist.double()

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


_PACK = 0x0102040810204080  # x * _PACK >> 56 packs the 0/1 bytes of a little-endian int64 x into one byte, LSB first
_SEEN: dict[tuple, torch.Tensor] = {}  # one zeroed 0/1 byte scratch per (device, size), shared by every layer


def _mark_tokens(bits: torch.Tensor, expert: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Set bit (i, v) of `token_bits` [E, B] (uint8) for every assignment of a token with id v to expert i.

    Without host synchronisation (a GPU keeps running ahead): repeated (expert, id) pairs all write 1
    into an unpacked byte scratch, which is packed 8 bytes at a time and or-ed in, then cleared.
    Ids are trusted to be < 8 B (Instrument.set_tokens checks each batch).
    """
    if ids is None:
        raise ValueError("token_bits needs the assignments' token ids")
    key = (bits.device, bits.numel())
    seen = _SEEN.get(key)
    if seen is None:
        seen = _SEEN[key] = torch.zeros(bits.numel() * 8, dtype=torch.uint8, device=bits.device)
    seen.scatter_(0, expert * (bits.shape[1] * 8) + ids, 1)  # a scatter of a constant: no sync, unlike index_put
    packed = seen.view(torch.int64).mul(_PACK).bitwise_right_shift_(56).bitwise_and_(0xFF)
    bits.view(-1).bitwise_or_(packed.to(torch.uint8))
    seen.zero_()


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """[..., B] uint8 -> [..., 8 B] uint8 0/1 (bit b of byte k, least significant first, is id 8k + b)."""
    shifts = torch.arange(8, device=packed.device)
    return ((packed[..., None].long() >> shifts) & 1).to(torch.uint8).flatten(-2)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_bits."""
    shifts = torch.arange(8, device=bits.device)
    return (bits.unflatten(-1, (-1, 8)).long() << shifts).sum(-1).to(torch.uint8)


def all_reduce_field(name: str, t: torch.Tensor) -> None:
    """Combine one field across torch.distributed ranks by its merge rule, in place (bit sets as 0/1 maxima,
    which every backend supports, unlike a bitwise or)."""
    import torch.distributed as dist

    merge = FIELD_BY_NAME[name].merge
    if merge == "or":
        bits = unpack_bits(t)
        dist.all_reduce(bits, op=dist.ReduceOp.MAX)
        t.copy_(pack_bits(bits))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if merge == "max" else dist.ReduceOp.SUM)


def holdout_accumulator(num_experts: int, hidden: int, inter: int, device) -> LayerAccumulator:
    return LayerAccumulator(num_experts, hidden, inter, device, fields=list(HOLDOUT_FIELDS))
