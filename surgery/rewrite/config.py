"""Rewrite config.json for a new expert count, and check the constraints a pruned config must meet."""

from __future__ import annotations

import copy
import re

from surgery.architectures import MoELayout


def rewrite_config(config: dict, layout: MoELayout, new_count: int, id_maps: dict[int, dict[int, int]],
                   per_layer: dict[int, int] | None = None) -> dict:
    """A copy of config.json with every alias of the expert count set to `new_count`.

    Only keys already present are updated (transformers writes aliases, Hub files the
    original spelling). Quantization ignore-lists naming single experts are renumbered.
    `per_layer` records non-uniform counts under `moe_surgery_experts_per_layer`.
    """
    out = copy.deepcopy(config)
    cfg = out
    for key in layout.spec.config_path:
        cfg = cfg[key]
    for key in layout.spec.expert_keys:
        if key in cfg:
            cfg[key] = new_count
    if per_layer is not None:
        cfg["moe_surgery_experts_per_layer"] = {str(k): v for k, v in sorted(per_layer.items())}
    quant = out.get("quantization_config")
    if isinstance(quant, dict):
        for key, value in quant.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                quant[key] = _renumber_names(value, layout, id_maps)
    return out


def _renumber_names(names: list[str], layout: MoELayout, id_maps: dict[int, dict[int, int]]) -> list[str]:
    out = []
    for name in names:
        m = re.search(r"\.experts\.(\d+)(\.|$)", name)
        layer = next((entry.layer for entry in layout.layers.values() if name.startswith(entry.prefix + ".")), None)
        if not m or layer is None or layer not in id_maps:
            out.append(name)
            continue
        old = int(m.group(1))
        new = id_maps[layer].get(old)
        if new is not None:
            out.append(name[: m.start(1)] + str(new) + name[m.end(1):])
    return out
