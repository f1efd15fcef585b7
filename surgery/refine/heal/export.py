"""Trained in-memory parameters back into the student's on-disk tensors, bytes for bytes.

transformers 5 fuses experts in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]) whatever the checkpoint holds, so expert weights go back through the layout the
student's shards actually use (per-expert Linear weights, or fused out_in / in_out, halves or
interleaved): the inverse of `surgery.io.expert_weights.read_expert`. Every other parameter maps to
one tensor by name (with the registry's in-memory renames). Values are cast to the tensor's
on-disk dtype; the writer copies every tensor not produced here byte for byte.
"""

from __future__ import annotations

import re

import torch

from surgery.architectures import MoELayout
from surgery.errors import UserError
from surgery.architectures.expert_math import ROLE_PATTERNS, FusedMatrix, memory_fused
from surgery.io import Checkpoint

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_LAYER = re.compile(r"layers\.(\d+)\.")


class ExportError(UserError):
    """A trained parameter has no on-disk tensor to go back into."""


def to_bytes(value: torch.Tensor, dtype: str) -> bytes:
    """Little-endian bytes of `value` in safetensors dtype `dtype` (BF16, F16 or F32)."""
    t = value.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    return t.view(torch.uint8).numpy().tobytes()


def _pack_fused(ckpt: Checkpoint, layout: MoELayout, layer: int, which: FusedMatrix, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """[E, 2I, H] gate_up or [E, H, I] down in the fused on-disk orientation and gate/up order."""
    entry, spec = layout.layers[layer], layout.spec
    name = next((n for n in entry.fused if which.disk.search(n)), None)
    if name is None:
        raise ExportError(f"{ckpt.dir}: layer {layer}: no fused {which.memory} tensor on disk to write the trained experts into")
    out = value
    if len(which.roles) == 2 and spec.interleaved:
        gate, up = value.chunk(2, dim=1)
        out = torch.stack([gate, up], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
    if spec.fused_orientation == "in_out":
        out = out.transpose(1, 2)
    return {name: out}


def _pack_per_expert(ckpt: Checkpoint, layout: MoELayout, layer: int, which: FusedMatrix, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One nn.Linear weight per expert and role (gate and up are the halves of gate_up_proj)."""
    entry = layout.layers[layer]
    roles = which.roles
    out: dict[str, torch.Tensor] = {}
    for e in range(value.shape[0]):
        parts = dict(zip(roles, value[e].chunk(len(roles), dim=0)))
        for name in entry.per_expert.get(e, []):
            for role, part in parts.items():
                if ROLE_PATTERNS[role].search(name):
                    out[name] = part
    if len(out) != value.shape[0] * len(roles):
        raise ExportError(f"{ckpt.dir}: layer {layer}: found {len(out)} of {value.shape[0] * len(roles)} "
                          f"per-expert tensors for {which.memory}")
    return out


def _layer_of(layout: MoELayout, name: str) -> int:
    found = _LAYER.findall(name)
    if not found or int(found[-1]) not in layout.layers:
        raise ExportError(f"{name}: not in an MoE layer of this checkpoint")
    return int(found[-1])


def _direct_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    if name in ckpt.weight_map:
        return name
    for mem, disk in renames:
        if (cand := name.replace(mem, disk)) in ckpt.weight_map:
            return cand
    return None


def disk_tensors(ckpt: Checkpoint, layout: MoELayout, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{on-disk tensor name: value in its on-disk shape} for in-memory parameters `params`."""
    out: dict[str, torch.Tensor] = {}
    glu = layout.spec.math.glu_halves
    for name, value in params.items():
        m = memory_fused(name)
        direct = _direct_name(ckpt, name, layout.spec.memory_renames)
        if m and glu and direct is None:
            layer = _layer_of(layout, name)
            pack = _pack_fused if layout.layers[layer].fused else _pack_per_expert
            out.update(pack(ckpt, layout, layer, m, value))
            continue
        if direct is None:
            raise ExportError(f"{ckpt.dir}: no on-disk tensor for trained parameter {name!r}")
        out[direct] = value
    for name, value in out.items():
        info = ckpt.info(name)
        if info.dtype not in TORCH_DTYPES:
            raise ExportError(f"{ckpt.file_of(name).path}: tensor {name!r} is {info.dtype}; heal writes only "
                              "bf16, fp16 and fp32 weights (quantized students are not supported)")
        if tuple(value.shape) != tuple(info.shape):
            raise ExportError(f"{ckpt.file_of(name).path}: tensor {name!r} has shape {list(info.shape)}, "
                              f"the trained value {list(value.shape)}")
    return out
