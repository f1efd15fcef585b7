"""Read a checkpoint's expert layout from its config and tensor names (never from model_type alone).

transformers 5 may save per-expert or fused tensors for the same model_type, so each MoE
layer's layout is detected from the names present on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from surgery.architectures.registry import ArchSpec, get_spec, supported


class ArchitectureError(Exception):
    """The config or tensor set does not fit a supported MoE architecture."""


@dataclass
class LayerExperts:
    """The tensors of one MoE layer, by role."""

    layer: int
    prefix: str  # e.g. "model.layers.3.mlp"
    router: dict[str, int] = field(default_factory=dict)  # tensor name -> expert axis
    per_expert: dict[int, list[str]] = field(default_factory=dict)  # expert id -> its tensor names
    fused: list[str] = field(default_factory=list)  # tensors with the expert axis first

    @property
    def layout(self) -> str:
        return "fused" if self.fused else "per-expert"


@dataclass
class MoELayout:
    spec: ArchSpec
    config: dict  # the (sub-)config holding the expert keys
    num_experts: int
    top_k: int
    num_hidden_layers: int
    layers: dict[int, LayerExperts]
    owner: dict[str, tuple[int, str, int | None]]  # tensor -> (layer, role, expert id or axis)

    @property
    def mtp_layers(self) -> list[int]:
        return [layer for layer in self.layers if layer >= self.num_hidden_layers]


def sub_config(config: dict, spec: ArchSpec, where: str = "config.json") -> dict:
    cfg = config
    for key in spec.config_path:
        if not isinstance(cfg.get(key), dict):
            raise ArchitectureError(f"{where}: model_type {spec.model_type} needs a {key!r} object")
        cfg = cfg[key]
    return cfg


def first_key(cfg: dict, keys: tuple[str, ...], what: str, where: str = "config.json") -> int:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return int(cfg[key])
    raise ArchitectureError(f"{where}: no {what} (looked for {', '.join(keys)})")


def spec_for(config: dict, where: str = "config.json") -> ArchSpec:
    model_type = config.get("model_type")
    spec = get_spec(model_type) if model_type else None
    if spec is None:
        raise ArchitectureError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(supported())}"
        )
    return spec


def resolve(config: dict, tensor_names: list[str], where: str = "config.json") -> MoELayout:
    """Classify every tensor of the checkpoint; layers are MoE layers iff router tensors exist.

    `where` names the config file in error messages.
    """
    spec = spec_for(config, where)
    cfg = sub_config(config, spec, where)
    num_experts = first_key(cfg, spec.expert_keys, "routed-expert count", where)
    top_k = first_key(cfg, spec.top_k_keys, "experts-per-token count", where)
    num_hidden = int(cfg.get("num_hidden_layers", config.get("num_hidden_layers", 0)))
    patterns = [(re.compile(p + r"\.(?P<rest>.+)$"), off) for p, off in spec.prefixes]
    router_axes = dict(spec.router)
    per_expert_re = re.compile(r"experts\.(\d+)\.(.+)$")
    layers: dict[int, LayerExperts] = {}
    owner: dict[str, tuple[int, str, int | None]] = {}
    for name in tensor_names:
        for pat, off in patterns:
            m = pat.match(name)
            if m:
                break
        else:
            continue
        layer = int(m["layer"]) + (num_hidden if off else 0)
        prefix = name[: m.start("rest") - 1]
        rest = m["rest"]
        entry = layers.setdefault(layer, LayerExperts(layer, prefix))
        pe = per_expert_re.match(rest)
        if rest in router_axes:
            entry.router[name] = router_axes[rest]
            owner[name] = (layer, "router", router_axes[rest])
        elif pe:
            eid = int(pe.group(1))
            entry.per_expert.setdefault(eid, []).append(name)
            owner[name] = (layer, "expert", eid)
        elif rest.startswith("experts.") or rest in spec.fused:
            entry.fused.append(name)
            owner[name] = (layer, "fused", 0)
    # Blocks without a router are not MoE layers (e.g. dense MLPs sharing the prefix).
    for layer in [layer for layer, e in layers.items() if not e.router]:
        for names in layers[layer].per_expert.values():
            for n in names:
                owner.pop(n, None)
        for n in layers[layer].fused:
            owner.pop(n, None)
        del layers[layer]
    if not layers:
        raise ArchitectureError(
            f"{where}: no MoE router tensors found for model_type {spec.model_type} "
            f"(expected names like {spec.prefixes[0][0]}.{spec.router[0][0]})"
        )
    return MoELayout(spec, cfg, num_experts, top_k, num_hidden, dict(sorted(layers.items())), owner)


def check_shapes(layout: MoELayout, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems where tensors disagree with the config's expert count (empty when consistent)."""
    problems = []
    e = layout.num_experts
    for layer, entry in layout.layers.items():
        for name, axis in entry.router.items():
            shape = shapes[name]
            if len(shape) <= axis or shape[axis] != e:
                problems.append(f"{name} has shape {list(shape)}, expected {e} experts on axis {axis}")
        for name in entry.fused:
            if not shapes[name] or shapes[name][0] != e:
                problems.append(f"{name} has shape {list(shapes[name])}, expected {e} experts on axis 0")
        if entry.per_expert:
            ids = sorted(entry.per_expert)
            if ids != list(range(e)):
                problems.append(f"layer {layer} has per-expert tensors for ids {ids[:3]}..{ids[-1]} ({len(ids)}), config says {e}")
    return problems


def active_groups(layout: MoELayout) -> int | None:
    """n_group when the router is group-limited (groups are contiguous id blocks), else None."""
    spec, cfg = layout.spec, layout.config
    if not spec.group_keys:
        return None
    if spec.group_when and cfg.get(spec.group_when[0]) != spec.group_when[1]:
        return None
    n_group = cfg.get(spec.group_keys[0]) or 1
    return int(n_group) if int(n_group) > 1 else None

