"""Read a checkpoint's expert layout from its config and tensor names (never from model_type alone).

transformers 5 may save per-expert or fused tensors for the same model_type, so each MoE
layer's layout is detected from the names present on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from surgery.errors import UserError
from surgery.architectures.registry import ArchSpec, get_spec, supported


class ArchitectureError(UserError):
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
    """The first of `keys` present, which must be a positive integer (a string or 0 is refused, not coerced)."""
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return positive_int(cfg[key], key, where)
    raise ArchitectureError(f"{where}: no {what} (looked for {', '.join(keys)})")


def positive_int(value: object, key: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArchitectureError(f"{where}: {key} must be an integer ≥ {minimum}, not {value!r}")
    return value


def _check_counts(cfg: dict, config: dict, spec: ArchSpec, layers: dict, num_hidden: int, num_experts: int,
                  top_k: int, where: str) -> None:
    """Config counts that contradict each other or the tensors on disk (the output would not load)."""
    if top_k > num_experts:
        raise ArchitectureError(f"{where}: {top_k} experts per token exceeds the {num_experts} routed experts")
    mtp = cfg.get(spec.mtp_count_key, config.get(spec.mtp_count_key, 0)) if spec.mtp_count_key else 0
    mtp = positive_int(mtp or 0, spec.mtp_count_key or "mtp", where, minimum=0)
    beyond = [layer for layer in layers if layer >= num_hidden + mtp]
    if beyond and not any(off for _, off in spec.prefixes):
        raise ArchitectureError(
            f"{where}: num_hidden_layers is {num_hidden}, but the tensors hold MoE layer {max(beyond)}")


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
    num_hidden = positive_int(cfg.get("num_hidden_layers", config.get("num_hidden_layers", 0)), "num_hidden_layers",
                              where, minimum=0)
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
    _check_counts(cfg, config, spec, layers, num_hidden, num_experts, top_k, where)
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
        problems += _matrix_problems(layout, entry, shapes)
    return problems


_MATRIX_RE = re.compile(r"(\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def _matrix_problems(layout: MoELayout, entry: LayerExperts, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Expert matrices must have a hidden_size side, and every expert the same shape per tensor role.

    A tensor with the right byte count but a different shape passes the byte checks yet fails to load.
    """
    hidden = layout.config.get("hidden_size")
    problems, by_role = [], {}
    names = [n for ns in entry.per_expert.values() for n in ns] + entry.fused
    for name in names:
        shape = shapes[name]
        if not _MATRIX_RE.search(name) or len(shape) < 2:
            continue
        if isinstance(hidden, int) and hidden not in shape[-2:]:
            problems.append(f"{name} has shape {list(shape)}: no side equals hidden_size {hidden}")
        role = re.sub(r"experts\.\d+\.", "experts.*.", name)
        if by_role.setdefault(role, shape) != shape:
            problems.append(f"{name} has shape {list(shape)}, other experts {list(by_role[role])}")
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

