"""How MoNE novices are stored: vLLM's `approximate_experts` config key and one value tensor per novice."""

from __future__ import annotations

from surgery.architectures import MoELayout
from surgery.errors import UserError

CONFIG_KEY = "approximate_experts"


VALUE_SUFFIX = "approx_value"


def value_name(layout: MoELayout, layer: int, expert: int) -> str:
    return f"{layout.layers[layer].prefix}.experts.{expert}.{VALUE_SUFFIX}"


def novice_experts(config: dict, where: str = "config.json") -> dict[int, list[int]]:
    """`approximate_experts` of a config dict, looked up where vLLM looks (text_config, then top level)."""
    for cfg in (config.get("text_config"), config):
        if isinstance(cfg, dict) and cfg.get(CONFIG_KEY):
            try:
                return {int(layer): sorted(int(i) for i in ids) for layer, ids in cfg[CONFIG_KEY].items() if ids}
            except (AttributeError, TypeError, ValueError):
                raise UserError(f"{where}: {CONFIG_KEY} must map layer numbers to lists of expert ids") from None
    return {}
