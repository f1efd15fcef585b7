"""A slow, independent reference for the collector's statistics (stats_formats/schema.py).

The model's routing is read with a forward pre-hook on each MoE block's `experts` module (its
arguments are the block input x [T, H], the selected ids [T, k] and the combine weights [T, k]).
Everything else is recomputed here token by token, in float64, from the raw parameters of the
router and experts modules. Nothing from surgery.collect is imported, and which router attribute
and scoring function an architecture uses is written down here, not read from the registry, so
a mistake there cannot make the reference agree with the collector.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from stats_formats.schema import FIELDS, MCSUITE_FIELDS

# Router probabilities over all experts: sigmoid of the logits for these, softmax for the rest.
SIGMOID_ROUTERS = frozenset({"deepseek_v3", "glm4_moe", "llama4_text", "llama4"})
# Attribute of the MoE block holding the router (a module with `weight` [E, H], maybe `bias` [E]).
ROUTER_ATTR = {mt: "router" for mt in ("phimoe", "gpt_oss", "granitemoe", "llama4_text", "llama4")}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Stats = dict[int, dict[str, np.ndarray]]


def find_moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> MoE block (a module whose `experts` child has a `down_proj`)."""
    blocks = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and hasattr(experts, "down_proj"):
            found = _LAYER.findall(name + ".")
            assert found, f"MoE block {name} outside a decoder layer"
            blocks[int(found[-1])] = module
    return blocks


def capture_routing(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[int, list[tuple]]:
    """Layer -> [(x [T, H], top_k_index [T, k], top_k_weights [T, k]) per forward], as the model routes
    (forward j is batches[j]: each MoE block runs once per forward)."""
    calls: dict[int, list[tuple]] = defaultdict(list)
    hooks = []
    for layer, block in find_moe_blocks(model).items():
        def pre_hook(module, args, kwargs, layer=layer):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
            x, idx, w = values
            calls[layer].append((x.detach().reshape(-1, x.shape[-1]).clone(), idx.detach().clone(), w.detach().clone()))
        hooks.append(block.experts.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return dict(calls)


class _Experts:
    """Raw float64 parameters of one experts module and the per-token expert formula."""

    def __init__(self, model_type: str, experts: torch.nn.Module, config):
        self.gpt_oss = model_type == "gpt_oss"
        d = lambda t: t.detach().to(torch.float64)  # noqa: E731
        self.gate_up = d(experts.gate_up_proj)
        self.down = d(experts.down_proj)
        if self.gpt_oss:  # gate_up [E, H, 2I] interleaved (gate = ::2, up = 1::2), down [E, I, H], biases
            self.gate_up_bias = d(experts.gate_up_proj_bias)
            self.down_bias = d(experts.down_proj_bias)
            self.alpha = float(config.swiglu_alpha)
            self.limit = float(config.swiglu_limit)
            self.E, self.H, self.I = self.down.shape[0], self.down.shape[2], self.down.shape[1]
        else:  # gate_up [E, 2I, H] (gate = first half of the rows, up = second), down [E, H, I]
            self.act = ACT2FN[config.hidden_act]
            self.E, self.H, self.I = self.down.shape[0], self.down.shape[1], self.down.shape[2]

    def h_f(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [I], f [H]) of expert e on one token x [H] (float64)."""
        if self.gpt_oss:
            gate_up = x @ self.gate_up[e] + self.gate_up_bias[e]
            gate, up = gate_up[0::2], gate_up[1::2]
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            h = (up + 1.0) * (gate * torch.sigmoid(gate * self.alpha))
            return h, h @ self.down[e] + self.down_bias[e]
        gate_up = self.gate_up[e] @ x
        gate, up = gate_up[: self.I], gate_up[self.I :]
        h = self.act(gate) * up
        return h, self.down[e] @ h


def _empty(E: int, H: int, I: int, vocab: int) -> dict[str, np.ndarray]:
    dims = {"E": E, "H": H, "I": I, "B": -(-vocab // 8)}
    return {f.name: np.zeros(tuple(int(s) if s.isdigit() else dims[s] for s in f.shape.split(",")))
            for f in (*FIELDS, *MCSUITE_FIELDS)}


def _histogram_add(hist: np.ndarray, f: np.ndarray) -> None:
    """out_hist of one output f [H]: s = sign(f) clip(8 log2|f| + 128, 0, 256), weight 1 - frac at floor(s)
    and frac at floor(s) + 1, grid point j in bin j + 256."""
    with np.errstate(divide="ignore"):
        s = np.sign(f) * np.clip(8.0 * np.log2(np.abs(f)) + 128.0, 0.0, 256.0)
    low = np.minimum(np.floor(s), 255.0)
    frac = s - low
    np.add.at(hist, low.astype(int) + 256, 1.0 - frac)
    np.add.at(hist, low.astype(int) + 257, frac)


def _accumulate(s: dict[str, np.ndarray], experts: _Experts, probs: torch.Tensor, x: torch.Tensor,
                idx: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
    """Add one forward's tokens (input ids `ids` [T]) to the sums, one token and one selected expert at a time."""
    E = experts.E
    assert ids.numel() == x.shape[0], (ids.numel(), x.shape)
    s["tokens"] += x.shape[0]
    s["prob_sum"] += probs.sum(0).numpy()
    for t in range(x.shape[0]):
        xt = x[t]
        xt2 = (xt * xt).numpy()
        chosen = []  # (expert, gate, f) of this token's selected experts
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            if e >= E:  # a masking index: no expert
                continue
            g = float(w[t, slot])
            p = float(probs[t, e])
            h, f = experts.h_f(e, xt)
            fn = f.numpy()
            hn = h.numpy()
            norm = float(np.sqrt((fn * fn).sum()))
            s["count"][e] += 1
            for a in range(3):
                for b in range(3):
                    s["moment_g"][a, b, e] += g**a * norm**b
                    s["moment_p"][a, b, e] += p**a * norm**b
            s["out_sum"][e] += fn
            s["out_sq_sum"][e] += fn * fn
            if norm > 0:
                s["out_unit_sum"][e] += fn / norm
            s["out_norm_max"][e] = max(s["out_norm_max"][e], norm)
            s["inter_norm_sum"][e] += float(np.sqrt((hn * hn).sum()))
            s["in_sq_sum"][e] += xt2
            s["in_gsq_sum"][e] += g * g * xt2
            s["inter_sq_sum"][e] += hn * hn
            s["inter_gsq_sum"][e] += g * g * hn * hn
            _histogram_add(s["out_hist"][e], fn)
            v = int(ids[t])
            s["token_bits"][e, v // 8] = int(s["token_bits"][e, v // 8]) | (1 << (v % 8))
            chosen.append((e, g, fn))
        for ei, gi, fi in chosen:
            for ej, gj, fj in chosen:
                s["coselect"][ei, ej] += 1
                s["gram"][ei, ej] += gi * gj * float(fi @ fj)


def reference_stats(model_dir: str | Path, main_batches: list[torch.Tensor],
                    held_batches: list[torch.Tensor]) -> tuple[Stats, Stats]:
    """(main, held-out) statistics of every MoE layer, every field, from a float32 model."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = config.model_type
    blocks = find_moe_blocks(model)
    out: list[Stats] = []
    for batches in (main_batches, held_batches):
        stats: Stats = {}
        for layer, calls in capture_routing(model, batches).items():
            block = blocks[layer]
            experts = _Experts(model_type, block.experts, config)
            router = getattr(block, ROUTER_ATTR.get(model_type, "gate"))
            weight = router.weight.detach().to(torch.float64)
            bias = getattr(router, "bias", None)
            assert weight.shape == (experts.E, experts.H), (layer, tuple(weight.shape))
            s = stats.setdefault(layer, _empty(experts.E, experts.H, experts.I, config.vocab_size))
            for (x, idx, w), ids in zip(calls, batches, strict=True):
                x64 = x.to(torch.float64)
                logits = x64 @ weight.T
                if bias is not None:
                    logits = logits + bias.detach().to(torch.float64)
                probs = torch.sigmoid(logits) if model_type in SIGMOID_ROUTERS else torch.softmax(logits, dim=-1)
                _accumulate(s, experts, probs, x64, idx, w.to(torch.float64), ids.reshape(-1))
        out.append(stats)
    return out[0], out[1]
