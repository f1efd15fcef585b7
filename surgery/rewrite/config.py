"""Rewrite config.json for a new expert count, and check the constraints a pruned config must meet."""

from __future__ import annotations

import copy
import re

from surgery.architectures import MoELayout
from surgery.plan.select import PlanError


def active_groups(layout: MoELayout) -> int | None:
    """n_group when the router is group-limited (groups are contiguous id blocks), else None."""
    spec, cfg = layout.spec, layout.config
    if not spec.group_keys:
        return None
    if spec.group_when and cfg.get(spec.group_when[0]) != spec.group_when[1]:
        return None
    n_group = cfg.get(spec.group_keys[0]) or 1
    return int(n_group) if int(n_group) > 1 else None


def check_keep(layout: MoELayout, layer: int, kept: list[int], where: str) -> None:
    """Refuse keep-lists that break the router's constraints, naming the plan file."""
    e, k = layout.num_experts, layout.top_k
    if layout.spec.fixed_top_k and len(kept) < layout.spec.fixed_top_k:
        raise PlanError(f"{where}: layer {layer} keeps {len(kept)} experts; {layout.spec.model_type} routing needs at least {layout.spec.fixed_top_k}")
    if len(kept) < k:
        raise PlanError(f"{where}: layer {layer} keeps {len(kept)} experts, fewer than top-k = {k}")
    n_group = active_groups(layout)
    if n_group:
        size = e // n_group
        per_group = [sum(1 for i in kept if i // size == g) for g in range(n_group)]
        if len(set(per_group)) != 1:
            raise PlanError(
                f"{where}: layer {layer} keeps {per_group} experts per router group; "
                f"group-limited routing ({n_group} groups of {size}) needs the same number in every group"
            )
        kept_per = per_group[0]
        if kept_per < layout.spec.min_group_size:
            raise PlanError(f"{where}: layer {layer} keeps {kept_per} per group; this router needs ≥ {layout.spec.min_group_size}")
        topk_group = int(layout.config.get(layout.spec.group_keys[1]) or 1)
        if topk_group * kept_per < k:
            raise PlanError(
                f"{where}: layer {layer}: topk_group {topk_group} × {kept_per} kept per group < top-k {k}"
            )


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
