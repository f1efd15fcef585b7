"""What a keep map must satisfy on a given model: ids in range, no duplicates, at least top-k, router groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from surgery.architectures import MoELayout
from surgery.architectures.layout import active_groups
from surgery.errors import PlanError


def complete(layout: MoELayout, keep: Mapping[int, Sequence[int]], where: str) -> dict[int, list[int]]:
    """Validate a keep map and extend it to MTP layers; ids come back sorted.

    MTP layers (beyond num_hidden_layers) share the config's single expert count; when the
    plan does not name them they reuse the keep-list of the last main MoE layer, the layer
    whose output they continue from.
    """
    e = layout.num_experts
    out: dict[int, list[int]] = {}
    for layer, ids in keep.items():
        ids = list(ids)
        if layer not in layout.layers:
            raise PlanError(f"{where}: layer {layer} has no experts (MoE layers: {_ranges(list(layout.layers))})")
        bad = [i for i in ids if not 0 <= i < e]
        if bad:
            raise PlanError(f"{where}: layer {layer} names expert ids {bad} outside 0..{e - 1}")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise PlanError(f"{where}: layer {layer} lists expert ids {dup} more than once")
        out[layer] = sorted(ids)
    main = [layer for layer in out if layer < layout.num_hidden_layers]
    for mtp in layout.mtp_layers:
        if mtp not in out and main:
            out[mtp] = out[max(main)]
    for layer, ids in out.items():
        check_keep(layout, layer, ids, where)
    return out


def _ranges(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if len(xs) <= 8 else f"{xs[0]}..{xs[-1]}"


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
