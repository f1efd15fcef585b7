"""One expert's gate/up/down matrices read from disk (one expert in memory at a time).

Weight-based criteria (weight_norm, aimer) and the collector's streaming mode need expert
matrices in nn.Linear orientation ([out, in]) whatever the on-disk layout: per-expert
tensors, fused [E, 2I, H] or [E, H, 2I], halves or interleaved gate/up. Router criteria
(mcs-rwn) read the layer's router weight [E, H] alone.

Quantized experts are dequantized to float32 on the way (surgery.io.quantization): per-expert FP8
weights with their `weight_scale_inv` / `weight_scale`, NVFP4 `weight_packed`, and fused MXFP4
`*_blocks`/`*_scales` (stored [E, 2I, H] / [E, H, I], rows = output features), one expert at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from surgery.architectures import MoELayout, resolve
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, ROLE_PATTERNS  # per-model names, re-exported
from surgery.architectures.layout import active_groups
from surgery.io import Checkpoint, CheckpointError
from surgery.io.quantization import dequantize, scheme_for


Matrices = dict[str, np.ndarray]


# A per-expert projection's weight as stored: `<proj>.weight` (float or FP8) or NVFP4 `<proj>.weight_packed`.
_STORED_WEIGHT = {role: re.compile(pat.pattern.replace(r"\.weight$", r"\.weight(_packed)?$"))
                  for role, pat in ROLE_PATTERNS.items()}
MXFP4_SUFFIX = "_blocks"


def read_expert(ckpt: Checkpoint, layout: MoELayout, layer: int, expert: int) -> Matrices:
    """{"gate": [I, H], "up": [I, H], "down": [H, I]} as float32 for one expert (dequantized if stored quantized)."""
    entry = layout.layers[layer]
    spec = layout.spec
    scheme = scheme_for(ckpt)
    if entry.per_expert:
        weights = {role: name.removesuffix("_packed") for name in entry.per_expert[expert]
                   for role, pat in _STORED_WEIGHT.items() if pat.search(name)}
        out: Matrices = {role: dequantize(ckpt, name, scheme=scheme) for role, name in weights.items()}
        if set(out) != set(ROLE_PATTERNS):
            raise CheckpointError(f"{ckpt.dir}: layer {layer} expert {expert}: cannot find gate/up/down weights "
                                  f"(found {entry.per_expert[expert]})")
        return out
    gate_up = next((n for n in entry.fused if FUSED_GATE_UP.search(n)), None)
    down = next((n for n in entry.fused if FUSED_DOWN.search(n)), None)
    if gate_up is not None and down is not None:
        gu = dequantize(ckpt, gate_up, index=expert, scheme=scheme)
        dn = dequantize(ckpt, down, index=expert, scheme=scheme)
        if spec.fused_orientation == "in_out":
            gu, dn = gu.T, dn.T
    else:
        # MXFP4 (gpt-oss): `experts.gate_up_proj_blocks` [E, 2I, H/32, 16] dequantizes to rows = outputs.
        blocks = {n.removesuffix(MXFP4_SUFFIX) for n in entry.fused if n.endswith(MXFP4_SUFFIX)}
        gate_up = next((n for n in blocks if FUSED_GATE_UP.search(n)), None)
        down = next((n for n in blocks if FUSED_DOWN.search(n)), None)
        if gate_up is None or down is None:
            raise CheckpointError(f"{ckpt.dir}: layer {layer}: fused expert weights not found "
                                  f"(found {entry.fused})")
        gu = dequantize(ckpt, gate_up, index=expert, scheme=scheme)
        dn = dequantize(ckpt, down, index=expert, scheme=scheme)
    if spec.interleaved:
        g, u = gu[0::2], gu[1::2]
    else:
        g, u = np.split(gu, 2, axis=0)
    return {"gate": np.ascontiguousarray(g), "up": np.ascontiguousarray(u), "down": np.ascontiguousarray(dn)}


def read_router(ckpt: Checkpoint, layout: MoELayout, layer: int) -> np.ndarray:
    """The layer's router weight [E, H] as float32: its one 2-D router tensor with the expert axis first
    (biases and correction terms are vectors); dequantized if a scheme stored it quantized."""
    names = [n for n, axis in layout.layers[layer].router.items() if axis == 0 and len(ckpt.info(n).shape) == 2]
    if len(names) != 1:
        raise CheckpointError(f"{ckpt.dir}: layer {layer}: expected one 2-D router weight, found {names or 'none'}")
    return dequantize(ckpt, names[0])


@dataclass(frozen=True)
class LayerWeights:
    """One MoE layer's weights, read when asked: call it with an expert id for its matrices."""

    ckpt: Checkpoint
    layout: MoELayout
    layer: int

    def __call__(self, expert: int) -> Matrices:
        return read_expert(self.ckpt, self.layout, self.layer, expert)

    def router(self) -> np.ndarray:
        return read_router(self.ckpt, self.layout, self.layer)


def expert_matrices(model_dir: str | Path) -> tuple[list[int], int, int, int | None, Callable[[int], LayerWeights]]:
    """(MoE layers, experts per layer, top-k, n_group or None, layer -> its LayerWeights)."""
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    return (list(layout.layers), layout.num_experts, layout.top_k, active_groups(layout),
            lambda layer: LayerWeights(ckpt, layout, layer))
