"""Trained in-memory parameters back into the student's on-disk tensors, bytes for bytes.

transformers 5 fuses experts in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]) whatever the checkpoint holds, so expert weights go back through the layout the
student's shards actually use (per-expert Linear weights, or fused out_in / in_out, halves or
interleaved): the inverse of `surgery.io.expert_weights.read_expert`. Every other parameter maps to
one tensor by name (with the registry's in-memory renames). Values are cast to the tensor's
on-disk dtype; the writer copies every tensor not produced here byte for byte.

Quantized weights (FP8, NVFP4, MXFP4) are addressed by their plain name (`W.weight`, fused `X`) and
re-encoded in the student's own scheme with fresh scales (surgery.io.requantize), or, with
output_dtype "bf16", written unquantized in the place of their codes (`encode_layer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from surgery.architectures import MoELayout
from surgery.errors import UserError
from surgery.architectures.expert_math import ROLE_PATTERNS, FusedMatrix, memory_fused
from surgery.io import Checkpoint
from surgery.io.novice_format import novice_experts
from surgery.io.quantization import scheme_for
from surgery.io.requantize import Encoded, plain, quantized, requantize, stored_name, stored_shape
from surgery.model.quant_encode import requantize_on_device

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
    novices = set(novice_experts(ckpt.config, str(ckpt.config_path)).get(layer, ()))  # no weights on disk
    out: dict[str, torch.Tensor] = {}
    for e in range(value.shape[0]):
        if e in novices:
            continue
        parts = dict(zip(roles, value[e].chunk(len(roles), dim=0)))
        for name in dict.fromkeys(n.removesuffix("_packed") for n in entry.per_expert.get(e, [])):
            for role, part in parts.items():
                if ROLE_PATTERNS[role].search(name):
                    out[name] = part
    want = (value.shape[0] - len(novices)) * len(roles)
    if len(out) != want:
        raise ExportError(f"{ckpt.dir}: layer {layer}: found {len(out)} of {want} per-expert tensors for "
                          f"{which.memory}")
    return out


def _layer_of(layout: MoELayout, name: str) -> int:
    found = _LAYER.findall(name)
    if not found or int(found[-1]) not in layout.layers:
        raise ExportError(f"{name}: not in an MoE layer of this checkpoint")
    return int(found[-1])


def _stored(ckpt: Checkpoint, name: str) -> bool:
    """Whether plain name `name` is on disk, as itself or quantized (`W.weight_packed`, `X_blocks`)."""
    names = ckpt.weight_map
    return name in names or f"{name}_blocks" in names or (name.endswith(".weight") and f"{name}_packed" in names)


def _direct_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    if _stored(ckpt, name):
        return name
    for mem, disk in renames:
        if _stored(ckpt, cand := name.replace(mem, disk)):
            return cand
    return None


def _to_storage(ckpt: Checkpoint, layout: MoELayout, name: str, value: torch.Tensor) -> torch.Tensor:
    """A plain on-disk value in storage orientation (rows = outputs): MXFP4 blocks are stored rows-first
    whatever the architecture's fused orientation."""
    if stored_name(ckpt, name).endswith("_blocks") and layout.spec.fused_orientation == "in_out":
        return value.transpose(-1, -2)
    return value


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
        if quantized(ckpt, name):
            want = stored_shape(ckpt, name)
            got = tuple(_to_storage(ckpt, layout, name, value).shape)
            where = ckpt.file_of(stored_name(ckpt, name)).path
        else:
            info = ckpt.info(name)
            want, got, where = tuple(info.shape), tuple(value.shape), ckpt.file_of(name).path
            if info.dtype not in TORCH_DTYPES:
                raise ExportError(f"{where}: tensor {name!r} is {info.dtype}; heal writes only bf16, fp16 and fp32 "
                                  "weights or the published quantized schemes (FP8, NVFP4, MXFP4)")
        if got != want:
            raise ExportError(f"{where}: tensor {name!r} has shape {list(want)}, the trained value {list(got)}")
    return out


OUTPUT_DTYPES = ("bf16",)


@dataclass
class LayerTensors:
    """One layer's trained tensors as written: their bytes, and the re-quantization error of each
    tensor re-encoded in the student's scheme; the modules written unquantized (model and disk names)."""

    tensors: list[Encoded] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    memory_modules: list[str] = field(default_factory=list)
    disk_modules: list[str] = field(default_factory=list)


def _shape_ok(ckpt: Checkpoint, name: str, value: torch.Tensor) -> bool:
    """The device encoders take values of the stored shape only."""
    return tuple(value.shape) == stored_shape(ckpt, name)


def _module(name: str) -> str:
    """`...experts` for an expert weight (fused or per expert: loaders match it as a prefix), else the
    weight's own module."""
    head, sep, _ = name.partition(".experts.")
    return head + ".experts" if sep else name.rsplit(".", 1)[0]


def encode_layer(ckpt: Checkpoint, layout: MoELayout, params: dict[str, torch.Tensor],
                 output_dtype: str | None = None) -> LayerTensors:
    """In-memory parameters `params` as the tensors to write: plain tensors in their on-disk dtype;
    quantized ones re-encoded in the student's scheme, or (output_dtype "bf16") written as bf16 in the place
    of their codes, companions dropped."""
    out = LayerTensors()
    scheme = scheme_for(ckpt)
    for mem_name, value in params.items():
        for disk_name, disk_value in disk_tensors(ckpt, layout, {mem_name: value}).items():
            if not quantized(ckpt, disk_name):
                info = ckpt.info(disk_name)
                out.tensors.append(Encoded(disk_name, info.dtype, info.shape, to_bytes(disk_value, info.dtype)))
                continue
            if not bool(torch.isfinite(disk_value).all()):
                raise ExportError(f"{ckpt.dir}: the trained value of {disk_name!r} is not finite; nothing written")
            if output_dtype == "bf16":
                out.tensors.append(plain(ckpt, disk_name, "BF16", tuple(disk_value.shape),
                                         to_bytes(disk_value, "BF16")))
                out.memory_modules.append(_module(mem_name))
                out.disk_modules.append(disk_name.removesuffix(".weight") if disk_name.endswith(".weight")
                                        else _module(disk_name))
                continue
            value32 = _to_storage(ckpt, layout, disk_name, disk_value).detach().float()
            done = None
            if _shape_ok(ckpt, disk_name, value32):  # else numpy's requantize names the mismatch
                try:
                    done = requantize_on_device(ckpt, disk_name, value32, scheme)
                except torch.OutOfMemoryError:  # the accelerator is full at the end of a run: the CPU's threads
                    done = requantize_on_device(ckpt, disk_name, value32.cpu(), scheme)
            encoded, error = done or requantize(ckpt, disk_name, value32.cpu().numpy(), scheme)
            out.tensors.extend(encoded)
            out.errors[disk_name] = error
    return out
