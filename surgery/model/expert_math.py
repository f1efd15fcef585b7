"""One expert's intermediate activation h and output f, from transformers 5's in-memory experts module.

Which formula applies is data: the architecture's kind (`ArchSpec.expert_math`) names a row of
`surgery.architectures.expert_math.EXPERT_MATH`, whose `formula` picks the code here; the collector's
self-check compares the combined result with the module's own output on the first batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery.architectures.expert_math import EXPERT_MATH, collectable_kinds

SUPPORTED = collectable_kinds()  # kinds with a formula below


def _formula(kind: str) -> str | None:
    return EXPERT_MATH[kind].formula if kind in EXPERT_MATH else None


def expert_forward(experts: torch.nn.Module, kind: str, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, f) for expert `e` on tokens `x` [n, H], in the module's dtype, exactly as the model computes them."""
    formula = _formula(kind)
    if formula == "glu":  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        return h, F.linear(h, experts.down_proj[e])
    if formula == "biased_clamped_glu":  # gate_up_proj [E, H, 2I] interleaved, biases, clamped SwiGLU
        h = experts._apply_gate(x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e])
        return h, h @ experts.down_proj[e] + experts.down_proj_bias[e]
    raise ValueError(f"no expert formula {kind!r}")


def grouped_forward(experts: torch.nn.Module, kind: str, x: torch.Tensor, expert: torch.Tensor,
                    counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, f) for assignments sorted by expert: grouped GEMMs (one kernel per projection) where
    transformers provides them for this device and dtype, else one GEMM per expert."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        _grouped_linear = None
    if _grouped_linear is None or kind not in SUPPORTED:
        return _looped(experts, kind, x, counts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    if _formula(kind) == "glu":
        gate, up = _grouped_linear(x, experts.gate_up_proj, offs).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        return h, _grouped_linear(h, experts.down_proj, offs)
    h = experts._apply_gate(_grouped_linear(x, experts.gate_up_proj, offs, bias=experts.gate_up_proj_bias[expert],
                                            is_transposed=True))
    return h, _grouped_linear(h, experts.down_proj, offs, bias=experts.down_proj_bias[expert], is_transposed=True)


def _looped(experts: torch.nn.Module, kind: str, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hs, fs, start = [], [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            h, f = expert_forward(experts, kind, e, x[start:start + n])
            hs.append(h)
            fs.append(f)
            start += n
    return torch.cat(hs), torch.cat(fs)


def router_probs(router: torch.nn.Module, scoring: str, x: torch.Tensor) -> torch.Tensor:
    """p over all experts (float32): softmax of the logits, or sigmoid for sigmoid routers."""
    logits = F.linear(x.float(), router.weight.float(), None if getattr(router, "bias", None) is None else router.bias.float())
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
