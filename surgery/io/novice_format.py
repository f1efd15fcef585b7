"""How MoNE novices are stored: vLLM's `approximate_experts` config key and one value tensor per novice."""

from __future__ import annotations

from surgery.architectures import MoELayout


CONFIG_KEY = "approximate_experts"


VALUE_SUFFIX = "approx_value"


def value_name(layout: MoELayout, layer: int, expert: int) -> str:
    return f"{layout.layers[layer].prefix}.experts.{expert}.{VALUE_SUFFIX}"

