"""The MoE blocks of a loaded transformers model: each block's experts module and router."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from surgery.architectures import ArchSpec
from surgery.architectures.expert_math import DOWN

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class MoEBlock:
    layer: int
    name: str
    experts: torch.nn.Module
    router: torch.nn.Module


def find_blocks(model: torch.nn.Module, spec: ArchSpec) -> list[MoEBlock]:
    """MoE blocks are modules with an `experts` child and the registry's router child."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, spec.router_module, None)
        if isinstance(experts, torch.nn.Module) and isinstance(router, torch.nn.Module) and hasattr(experts, DOWN.memory):
            found = _LAYER_RE.findall(name + ".")
            if found:
                blocks.append(MoEBlock(int(found[-1]), name, experts, router))
    return sorted(blocks, key=lambda b: b.layer)

