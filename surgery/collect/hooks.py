"""Instrument a transformers 5 MoE model: each experts module computes its output and our sums at once.

Routing comes from the model itself: the experts module is called with the top-k ids and the
combine weights the model applies. We replace its forward with one that computes each expert's
h and f once, accumulates the statistics, and returns the same combined output; on the first
batch the original forward also runs and the two outputs must agree (the self-check).
"""

from __future__ import annotations

import re
from functools import partial

import torch

from surgery.architectures import ArchSpec
from surgery.model.blocks import MoEBlock, find_blocks
from surgery.errors import UserError
from surgery.collect.accumulator import Assignments, LayerAccumulator, holdout_accumulator
from surgery.model.expert_math import SUPPORTED, grouped_forward, router_probs

_LAYER_RE = re.compile(r"layers\.(\d+)\.")
CHECK_TOKENS = 1024
DENSE_ROWS = 65536  # (expert, token) rows per step of the merging fields' every-expert-on-every-token pass


def _logits(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] in float32 (before softmax or sigmoid)."""
    bias = getattr(router, "bias", None)
    return torch.nn.functional.linear(x.float(), router.weight.float(), None if bias is None else bias.float())


class SelfCheckError(UserError):
    """Our recomputed expert outputs disagree with the model's own MoE output."""


class Instrument:
    """Holds one accumulator per layer and the patched experts modules.

    With a `vocab_size`, the main statistics also record which token ids each expert saw
    (`token_bits`): the caller hands over each batch's input ids with `set_tokens` before its forward.
    `histogram` adds the output-value histogram (`out_hist`, for mcs-eao); `merge_stats` the merging fields.
    """

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, device, self_check_tol: float,
                 vocab_size: int | None = None, histogram: bool = False, merge_stats: bool = False):
        if spec.expert_math not in SUPPORTED:
            raise SelfCheckError(f"collect does not support {spec.model_type} yet (expert formula {spec.expert_math!r})")
        self.spec = spec
        self.blocks = find_blocks(model, spec)
        if not self.blocks:
            raise SelfCheckError(f"no MoE blocks with an experts module found in the {spec.model_type} model")
        self.device = device
        self.tol = self_check_tol
        self.holdout = False  # when True, sums go to the held-out accumulators
        self.vocab_size = vocab_size
        self.histogram = histogram
        self.merge_stats = merge_stats
        self.token_ids: torch.Tensor | None = None  # the current batch's input ids, flattened
        self._ids_on: dict[torch.device, torch.Tensor] = {}  # ... copied to each device once per batch
        self.check_pending = {b.layer for b in self.blocks}
        self.main: dict[int, LayerAccumulator] = {}
        self.held: dict[int, LayerAccumulator] = {}
        self._originals = {}
        for b in self.blocks:
            self._patch(b)

    def dims(self, b: MoEBlock) -> tuple[int, int, int]:
        """(experts, hidden size, intermediate size) from the down matrix and its hidden axis in the expert math table."""
        name, hidden_axis = self.spec.math.down
        shape = getattr(b.experts, name).shape
        return shape[0], shape[hidden_axis], shape[3 - hidden_axis]

    def set_tokens(self, ids: torch.Tensor) -> None:
        """The input ids [batch, seq] of the batch about to run (the MoE blocks see its tokens flattened).
        Checked against the vocabulary here, once per batch, so the per-layer marking never waits on the GPU."""
        ids = ids.reshape(-1)
        if self.vocab_size and ids.numel() and int(ids.max()) >= self.vocab_size:
            raise SelfCheckError(f"token id {int(ids.max())} is outside the vocabulary ({self.vocab_size} ids)")
        self.token_ids = ids
        self._ids_on = {}

    def _acc(self, b: MoEBlock) -> LayerAccumulator:
        if self.holdout:
            table, make = self.held, holdout_accumulator
        else:
            table, make = self.main, partial(LayerAccumulator, vocab_size=self.vocab_size, histogram=self.histogram,
                                       merge_stats=self.merge_stats)
        if b.layer not in table:
            table[b.layer] = make(*self.dims(b), self.device)
        return table[b.layer]

    def _tokens(self, b: MoEBlock, n: int, device: torch.device) -> torch.Tensor:
        """The current batch's ids, checked against the block's token count (their order is the model's)."""
        have = -1 if self.token_ids is None else self.token_ids.numel()
        if have != n:
            raise SelfCheckError(f"layer {b.layer} ({b.name}) got {n} tokens but the collector set {max(have, 0)} "
                                 "token ids for this batch (Instrument.set_tokens before each forward)")
        if device not in self._ids_on:
            self._ids_on[device] = self.token_ids.to(device)
        return self._ids_on[device]

    def _patch(self, b: MoEBlock) -> None:
        original = b.experts.forward
        self._originals[b.layer] = original

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            out = self._run(b, hidden_states, top_k_index, top_k_weights)
            if b.layer in self.check_pending:
                n = min(CHECK_TOKENS, hidden_states.shape[0])  # a slice keeps the check cheap in time and memory
                theirs = original(hidden_states[:n], top_k_index[:n], top_k_weights[:n], *args, **kwargs)
                self._self_check(b, out[:n], theirs)
            return out

        b.experts.forward = forward

    def restore(self) -> None:
        for b in self.blocks:
            b.experts.forward = self._originals[b.layer]

    @torch.no_grad()
    def _run(self, b: MoEBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The experts' combined output, computing each expert once on its tokens (sorted by expert)."""
        acc = self._acc(b)
        num_experts, k = acc.E, idx.shape[1]
        full = acc.has("out_sum")
        probs = router_probs(b.router, self.spec.scoring, x) if full else None
        acc.add_tokens(probs, x.shape[0])
        if acc.has("dense_out_sum"):
            acc.add_dense(self._dense_sum(b, x, num_experts), _logits(b.router, x))
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        if getattr(b.experts, "_is_expert_parallel", False):
            order = order[flat[order] < num_experts]  # expert parallelism marks other ranks' slots with id E
        tok = order // k
        expert = flat[order]
        # per-expert counts by a scatter: bincount would wait for the GPU to size its output
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, expert, torch.ones_like(expert))
        xs = x[tok]
        g = w.reshape(-1)[order]
        ids = self._tokens(b, x.shape[0], x.device)[tok] if acc.has("token_bits") else None
        hs, fs = grouped_forward(b.experts, self.spec.expert_math, xs, expert, counts)
        # Outputs back in token order [T, k, H], in the model's dtype (exactly as computed), gates apart.
        outs = x.new_zeros(idx.shape[0] * k, x.shape[1]).index_copy_(0, order, fs.to(x.dtype)).view(idx.shape[0], k, -1)
        gates = torch.zeros(idx.shape[0] * k, dtype=w.dtype, device=w.device).index_copy_(0, order, g).view(-1, k)
        acc.add_assignments(Assignments(expert, counts, xs, g, probs[tok, expert] if full else None, hs, fs, ids))
        del xs, hs, fs
        acc.add_pairs(idx, gates, outs)
        # Σ_k g·f per token as a batched (1×k)·(k×H) product: no scattered adds, no [T, k, H] temporary.
        return torch.bmm(gates.to(x.dtype)[:, None, :], outs)[:, 0]

    def _dense_sum(self, b: MoEBlock, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """sum over the batch's tokens of every expert's output f_i(x), routed or not: [E, H] (HC-SMoE),
        a few experts at a time to bound the [experts x tokens, H] temporaries."""
        per = max(1, DENSE_ROWS // max(1, x.shape[0]))
        out = []
        for start in range(0, num_experts, per):
            ids = torch.arange(start, min(start + per, num_experts), device=x.device)
            counts = torch.zeros(num_experts, dtype=torch.long, device=x.device)
            counts[ids] = x.shape[0]
            _, f = grouped_forward(b.experts, self.spec.expert_math, x.repeat(len(ids), 1),
                                   ids.repeat_interleave(x.shape[0]), counts)
            out.append(f.float().view(len(ids), x.shape[0], -1).sum(1))
        return torch.cat(out)

    def _self_check(self, b: MoEBlock, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        self.check_pending.discard(b.layer)
        denom = theirs.float().norm().clamp_min(1e-12)
        err = ((ours.float() - theirs.float()).norm() / denom).item()
        if not err <= self.tol:
            raise SelfCheckError(
                f"self-check failed at layer {b.layer} ({b.name}): our gated expert outputs differ from the model's "
                f"MoE output by {err:.2e} (relative, tolerance {self.tol:.0e}); the {self.spec.model_type} expert "
                "layout is being misread, so no statistics were written"
            )


def instrument_for(model: torch.nn.Module, spec: ArchSpec, device, tol: float, vocab_size: int | None,
                   options) -> Instrument:
    """The Instrument a collect's options (surgery.collect.options.CollectOptions) ask for."""
    return Instrument(model, spec, device, tol, vocab_size=vocab_size, histogram=options.histogram,
                      merge_stats=options.merge_stats)
