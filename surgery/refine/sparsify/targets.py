"""Which stored tensors to sparsify, and the statistics that score their input channels.

Statistics must come from this checkpoint or, via its pruning.json, from the model its experts
were removed from (checked by router bytes); expert ids then map through pruning.json's expert_map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stats_formats import StatsFile

from surgery.architectures import MoELayout
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, PROJECTION_ROLE, ROLE_PATTERNS, SHARED_RE
from surgery.errors import UserError
from surgery.io import Checkpoint, provenance
from surgery.io.identity import check_stats_match, router_mismatch
from surgery.io.quantization import stored_form
from surgery.refine.sparsify.masks import BITS_DTYPES, SparsifyError

# Statistics field per method and input side: "in" feeds gate/up (size H), "inter" feeds down (size I).
NORM_FIELDS = {
    "moe-pruner": {"in": "in_gsq_sum", "inter": "inter_gsq_sum"},
    "wanda": {"in": "in_sq_sum", "inter": "inter_sq_sum"},
}


@dataclass(frozen=True)
class Target:
    """One stored weight to sparsify. Fused tensors hold one [out, in] or [in, out] slab per expert.

    Quantized weights (`form` "fp8": one FP8 code per value; "fp4": NVFP4 `weight_packed` or MXFP4 `_blocks`,
    two e2m1 codes per byte) are masked on their dequantized values, which are always [out, in] per expert
    (surgery.io.quantization.dequantize), so `input_axis` is the last axis of those values.
    """

    layer: int
    side: str  # "in": the input is the MoE block input x (gate/up); "inter": the expert's h (down)
    input_axis: int  # axis of the stored tensor (of its dequantized values when quantized) that indexes inputs
    expert: int | None = None  # per-expert tensors; None for fused (slab i = expert i) and shared ones
    shared: bool = False
    form: str | None = None  # None (plain floats), "fp8" or "fp4"

    @property
    def fused(self) -> bool:
        return self.expert is None and not self.shared


def _check_dtype(ckpt: Checkpoint, name: str) -> None:
    dtype = ckpt.info(name).dtype
    if dtype not in BITS_DTYPES and stored_form(ckpt, name) is None:
        raise SparsifyError(f"{ckpt.file_of(name).path}: {name} is {dtype}; only bf16/fp16/fp32, FP8, NVFP4 and "
                            "MXFP4 expert weights can be sparsified")


def _logical(name: str) -> str:
    """The weight's unquantized name: NVFP4 `W.weight_packed` is `W.weight`, MXFP4 `X_blocks` is `X`."""
    return name.removesuffix("_packed") if name.endswith(".weight_packed") else name.removesuffix("_blocks")


def _layer_targets(ckpt: Checkpoint, layout: MoELayout, layer: int) -> dict[str, Target]:
    entry = layout.layers[layer]
    out: dict[str, Target] = {}
    if entry.per_expert:
        for expert, names in entry.per_expert.items():
            found = {role: n for n in names for role, pat in ROLE_PATTERNS.items() if pat.search(_logical(n))}
            if set(found) != set(ROLE_PATTERNS):
                raise SparsifyError(f"{ckpt.dir}: layer {layer} expert {expert}: no gate/up/down weights among {names}")
            for role, name in found.items():
                out[name] = Target(layer, "inter" if role == "down" else "in", 1, expert, form=stored_form(ckpt, name))
        return out
    gate_up = [n for n in entry.fused if FUSED_GATE_UP.search(_logical(n))]
    down = [n for n in entry.fused if FUSED_DOWN.search(_logical(n))]
    if len(gate_up) != 1 or len(down) != 1:
        raise SparsifyError(f"{ckpt.dir}: layer {layer}: no fused gate_up/down expert weights among {entry.fused}")
    for name, side in ((gate_up[0], "in"), (down[0], "inter")):
        form = stored_form(ckpt, name)
        quantized_or_out_in = form is not None or layout.spec.fused_orientation == "out_in"
        out[name] = Target(layer, side, 2 if quantized_or_out_in else 1, form=form)
    return out


def find_targets(ckpt: Checkpoint, layout: MoELayout, layers: list[int], include_shared: bool) -> dict[str, Target]:
    """Routed expert weights of `layers` (and their shared experts' when asked), validated as maskable
    (plain floats, or FP8 / e2m1 codes)."""
    out: dict[str, Target] = {}
    for layer in layers:
        out.update(_layer_targets(ckpt, layout, layer))
    if include_shared:
        by_prefix = {layout.layers[layer].prefix: layer for layer in layers}
        for name in ckpt.names():
            m = SHARED_RE.search(_logical(name))
            layer = by_prefix.get(name[: m.start()]) if m else None
            if layer is not None:
                out[name] = Target(layer, "inter" if PROJECTION_ROLE[m[1]] == "down" else "in", 1, shared=True,
                                   form=stored_form(ckpt, name))
    for name in out:
        _check_dtype(ckpt, name)
    return out


class ChannelNorms:
    """sqrt of the per-channel sums for each expert, read from the statistics file one layer field at a time.

    Expert ids in the checkpoint map to statistics ids through `expert_map` (layer -> kept original
    ids) when the checkpoint had experts removed after the statistics were collected. Shared experts
    see every token, so their gate/up use the plain sums over all routed experts (each token counted
    top-k times: a constant factor, harmless inside a row); no statistic describes their down input.
    """

    def __init__(self, stats: StatsFile | None, method: str, expert_map: dict[int, list[int]]):
        self.stats, self.method, self.expert_map = stats, method, expert_map
        self.unrouted: dict[int, list[int]] = {}
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def _field(self, layer: int, field: str) -> np.ndarray:
        """[E, channels] sums; a few fields are cached (a layer's tensors mostly sit together in a shard)."""
        if (layer, field) not in self._cache:
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[layer, field] = np.asarray(self.stats.get(layer, field))
        return self._cache[layer, field]

    def score_name(self, target: Target) -> str:
        if self.stats is None or (target.shared and target.side == "inter"):
            return "magnitude"
        return "wanda" if target.shared else self.method

    def get(self, target: Target, expert: int | None) -> np.ndarray | None:
        """Channel norms for one matrix, or None for magnitude (also for experts never routed in calibration)."""
        score = self.score_name(target)
        if score == "magnitude":
            return None
        field = NORM_FIELDS[score][target.side]
        if target.shared:
            return np.sqrt(self._field(target.layer, field).sum(axis=0))
        ids = self.expert_map.get(target.layer)
        sums = self._field(target.layer, field)[ids[expert] if ids else expert]
        if not sums.any():
            self.unrouted.setdefault(target.layer, [])
            if expert not in self.unrouted[target.layer]:
                self.unrouted[target.layer].append(expert)
            return None
        return np.sqrt(sums)


def stats_expert_map(ckpt: Checkpoint, layout: MoELayout, stats: StatsFile) -> dict[int, list[int]]:
    """{} when the statistics were collected on this checkpoint; the keep-lists of pruning.json
    when they were collected on the model this checkpoint was pruned from (checked by router bytes)."""
    try:
        check_stats_match(ckpt.dir, stats)
        return {}
    except UserError:
        doc = provenance.read(ckpt.dir)
        source = (doc.get("source") or {}).get("path")
        if not doc.get("expert_map") or not source:
            raise
    try:
        check_stats_match(source, stats)
    except UserError:
        raise SparsifyError(f"{stats.label}: statistics were collected neither on {ckpt.dir} nor on {source}, "
                            "the model it was pruned from") from None
    keep = provenance.expert_map(doc, ckpt.dir)
    with Checkpoint(source) as src:
        bad = router_mismatch(ckpt, layout, src, keep)
        if bad is not None:
            raise SparsifyError(f"{ckpt.dir}: {bad} is not the kept rows of {src.dir}'s "
                                f"(is {provenance.PRUNING_JSON} stale?)")
    return keep
