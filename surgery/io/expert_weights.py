"""One expert's gate/up/down matrices read from disk (one expert in memory at a time).

Weight-based criteria (weight_norm, aimer) and the collector's streaming mode need expert
matrices in nn.Linear orientation ([out, in]) whatever the on-disk layout: per-expert
tensors, fused [E, 2I, H] or [E, H, 2I], halves or interleaved gate/up. Router criteria
(mcs-rwn) read the layer's router weight [E, H] alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from surgery.architectures import MoELayout, resolve
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, ROLE_PATTERNS  # per-model names, re-exported
from surgery.architectures.layout import active_groups
from surgery.io import Checkpoint, CheckpointError, decode


Matrices = dict[str, np.ndarray]


def _slab(ckpt: Checkpoint, name: str, expert: int) -> np.ndarray:
    """Expert `expert`'s slab of a fused tensor, reading only its bytes."""
    info = ckpt.info(name)
    slab_bytes = info.nbytes // info.shape[0]
    begin = info.begin + expert * slab_bytes
    raw = ckpt.file_of(name).read_range(begin, begin + slab_bytes)
    return decode(raw, info.dtype, info.shape[1:], where=f"{ckpt.file_of(name).path}: tensor {name!r}")


def read_expert(ckpt: Checkpoint, layout: MoELayout, layer: int, expert: int) -> Matrices:
    """{"gate": [I, H], "up": [I, H], "down": [H, I]} as float32 for one expert."""
    entry = layout.layers[layer]
    spec = layout.spec
    if entry.per_expert:
        out: Matrices = {}
        for name in entry.per_expert[expert]:
            for role, pat in ROLE_PATTERNS.items():
                if pat.search(name):
                    out[role] = ckpt.array(name).astype(np.float32)
        if set(out) != set(ROLE_PATTERNS):
            raise CheckpointError(f"{ckpt.dir}: layer {layer} expert {expert}: cannot find gate/up/down weights "
                                  f"(found {entry.per_expert[expert]}; quantized experts are not supported here)")
        return out
    gate_up = next((n for n in entry.fused if FUSED_GATE_UP.search(n)), None)
    down = next((n for n in entry.fused if FUSED_DOWN.search(n)), None)
    if gate_up is None or down is None:
        raise CheckpointError(f"{ckpt.dir}: layer {layer}: fused expert weights not readable as numbers "
                              f"(found {entry.fused}; quantized layouts such as MXFP4 are not supported here)")
    gu = _slab(ckpt, gate_up, expert).astype(np.float32)
    dn = _slab(ckpt, down, expert).astype(np.float32)
    if spec.fused_orientation == "in_out":
        gu, dn = gu.T, dn.T
    if spec.interleaved:
        g, u = gu[0::2], gu[1::2]
    else:
        g, u = np.split(gu, 2, axis=0)
    return {"gate": np.ascontiguousarray(g), "up": np.ascontiguousarray(u), "down": np.ascontiguousarray(dn)}


def read_router(ckpt: Checkpoint, layout: MoELayout, layer: int) -> np.ndarray:
    """The layer's router weight [E, H] as float32: its one 2-D router tensor with the expert axis first
    (biases and correction terms are vectors)."""
    names = [n for n, axis in layout.layers[layer].router.items() if axis == 0 and len(ckpt.info(n).shape) == 2]
    if len(names) != 1:
        raise CheckpointError(f"{ckpt.dir}: layer {layer}: expected one 2-D router weight, found {names or 'none'}")
    return ckpt.array(names[0]).astype(np.float32)


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
