"""One expert's intermediate activation h and output f, from transformers 5's in-memory experts module.

Which formula applies is data in the registry (`ArchSpec.expert_math`); the collector's
self-check compares the combined result with the module's own output on the first batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("glu_halves", "gpt_oss")


def expert_forward(experts: torch.nn.Module, kind: str, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, f) for expert `e` on tokens `x` [n, H], in the module's dtype, exactly as the model computes them."""
    if kind == "glu_halves":  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        return h, F.linear(h, experts.down_proj[e])
    if kind == "gpt_oss":  # gate_up_proj [E, H, 2I] interleaved, biases, clamped SwiGLU
        h = experts._apply_gate(x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e])
        return h, h @ experts.down_proj[e] + experts.down_proj_bias[e]
    raise ValueError(f"no expert formula {kind!r}")


def router_probs(router: torch.nn.Module, scoring: str, x: torch.Tensor) -> torch.Tensor:
    """p over all experts (float32): softmax of the logits, or sigmoid for sigmoid routers."""
    logits = F.linear(x.float(), router.weight.float(), None if getattr(router, "bias", None) is None else router.bias.float())
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
