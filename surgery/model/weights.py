"""Reading a model's weights from the safetensors shards straight into tensors on a device.

`plan_module` says, for every parameter and persistent buffer of a materialised module, which
on-disk tensor (or which slice of which fused tensor) fills it, using the architecture registry's
facts (in-memory renames, per-expert vs fused on disk, fused orientation): nothing here names a model.
`surgery.model.reader.WeightReader` then reads those byte ranges onto the device.

Quantized checkpoints (surgery.io.quantization: FP8 block/channel/tensor, NVFP4, MXFP4) are read
dequantized: a parameter whose on-disk tensor is quantized becomes a piece (one tensor, or one expert of
a fused tensor) carrying where its codes and scales lie (`Encoded`); the reader copies those raw bytes to
the target's device and decodes them there (surgery.model.dequant), then applies the same transforms as
the unquantized path and casts to the model's dtype. The host holds only raw codes in flight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from surgery.architectures import MoELayout
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, ROLE_PATTERNS, memory_fused
from surgery.errors import UserError
from surgery.io import Checkpoint
from surgery.io.novice_format import novice_experts
from surgery.io.quantization import Encoded, companions, encoded, is_quantized
from surgery.io.safetensors_file import SafetensorsFile, TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StreamingError(UserError):
    """The architecture cannot be loaded from its shards this way (a parameter has no on-disk tensor)."""


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor and where it goes: `target` (a tensor or a view of one), after `transform`
    ("t": swap the last two axes; "deinterleave": gate = rows ::2, up = rows 1::2, stacked as halves).

    A quantized tensor has `quantized` set: the weight's name as `dequantize` takes it (`W.weight`, or the
    MXFP4 parameter `X`), with `index` the expert slab of a fused tensor (None: the whole tensor) and
    `encoded` where its codes and scales lie; `file`/`info` are then those of its stored codes."""

    target: torch.Tensor
    file: SafetensorsFile
    info: TensorInfo
    transform: tuple[str, ...] = ()
    quantized: str | None = None
    index: int | None = None
    encoded: Encoded | None = None

    @property
    def direct(self) -> bool:
        """Bytes can go straight into the target's memory."""
        return (self.quantized is None and not self.transform and self.target.dtype == TORCH_DTYPES.get(self.info.dtype)
                and self.target.is_contiguous() and tuple(self.target.shape) == tuple(self.info.shape))


def _stored(ckpt: Checkpoint, name: str) -> bool:
    """`name` is on disk, as itself or in a quantized form (NVFP4 `W.weight_packed`, MXFP4 `X_blocks`)."""
    names = ckpt.weight_map
    return (name in names or f"{name}_blocks" in names
            or (name.endswith(".weight") and f"{name}_packed" in names))


def disk_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    """The on-disk tensor holding in-memory parameter `name` (the registry's renames applied), or None.
    A quantized tensor is named as `dequantize` takes it (`W.weight` for NVFP4, `X` for MXFP4 blocks)."""
    if _stored(ckpt, name):
        return name
    for mem, disk in renames:
        cand = name.replace(mem, disk)
        if _stored(ckpt, cand):
            return cand
    return None


def _codes_name(ckpt: Checkpoint, name: str) -> str:
    """The stored tensor holding a (possibly quantized) weight's values: itself, `_packed` or `_blocks`."""
    names = ckpt.weight_map
    if name in names:
        return name
    if f"{name}_blocks" in names:
        return f"{name}_blocks"
    return f"{name}_packed"


def dequantized_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    """The shape `dequantize(ckpt, name)` returns, from the header alone (storage orientation)."""
    stored = _codes_name(ckpt, name)
    shape = tuple(ckpt.info(stored).shape)
    if stored.endswith("_blocks"):  # [..., G, 16] -> [..., 32 G]
        return (*shape[:-2], shape[-2] * 2 * shape[-1]) if len(shape) >= 2 else shape
    if stored.endswith("_packed"):  # two codes per byte
        return (*shape[:-1], 2 * shape[-1]) if shape else shape
    return shape


def _quantized(ckpt: Checkpoint, name: str) -> bool:
    return is_quantized(ckpt, _codes_name(ckpt, name))


def _piece(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...] = ()) -> Piece:
    if _quantized(ckpt, name):
        return _quantized_piece(ckpt, name, target, transform, None)
    info = ckpt.info(name)
    if info.dtype not in TORCH_DTYPES:
        raise StreamingError(f"{ckpt.dir}: {name} is stored as {info.dtype}, which cannot be loaded this way")
    shape = _transformed_shape(tuple(info.shape), transform)
    if shape != tuple(target.shape):
        raise StreamingError(f"{ckpt.dir}: {name} has shape {list(info.shape)}, the model expects {list(target.shape)}")
    return Piece(target, ckpt.file_of(name), info, transform)


def _quantized_piece(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...],
                     index: int | None) -> Piece:
    shape = dequantized_shape(ckpt, name)
    if index is not None:
        shape = shape[1:]
    if _transformed_shape(shape, transform) != tuple(target.shape):
        raise StreamingError(f"{ckpt.dir}: {name} dequantizes to shape {list(shape)}, the model expects "
                             f"{list(target.shape)}")
    stored = _codes_name(ckpt, name)
    return Piece(target, ckpt.file_of(stored), ckpt.info(stored), transform, quantized=name, index=index,
                 encoded=encoded(ckpt, name, index))


def _mxfp4_transform(transform: tuple[str, ...]) -> tuple[str, ...]:
    """MXFP4 dequantizes to the storage orientation (rows = outputs), the transpose of the unquantized tensor
    on disk (gpt-oss: [E, H, 2I] in bf16, [E, 2I, H] as blocks): one more swap of the last two axes."""
    return transform[1:] if transform[:1] == ("t",) else ("t", *transform)


def _pieces(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...] = ()) -> list[Piece]:
    """The pieces filling `target` from on-disk `name`: one, or one per expert (axis 0) for a quantized
    tensor with more than two axes (fused experts), so one expert at a time is decoded."""
    if not _quantized(ckpt, name):
        return [_piece(ckpt, name, target, transform)]
    if _codes_name(ckpt, name).endswith("_blocks"):
        transform = _mxfp4_transform(transform)
    if len(dequantized_shape(ckpt, name)) <= 2 or target.ndim < 1:
        return [_quantized_piece(ckpt, name, target, transform, None)]
    if target.shape[0] != dequantized_shape(ckpt, name)[0]:
        raise StreamingError(f"{ckpt.dir}: {name} dequantizes to shape {list(dequantized_shape(ckpt, name))}, "
                             f"the model expects {list(target.shape)}")
    return [_quantized_piece(ckpt, name, target[e], transform, e) for e in range(target.shape[0])]


def _transformed_shape(shape: tuple[int, ...], transform: tuple[str, ...]) -> tuple[int, ...]:
    for t in transform:
        if t == "t":
            shape = (*shape[:-2], shape[-1], shape[-2])
    return shape


def _fused_pieces(ckpt: Checkpoint, layout: MoELayout, layer: int, key: str, target: torch.Tensor,
                  roles: tuple[str, ...]) -> list[Piece]:
    """A transformers-5 fused expert parameter ([E, 2I, H] gate rows then up rows, or [E, H, I] down)
    from per-expert tensors (one piece per expert and role, into its rows) or from a fused tensor."""
    entry = layout.layers.get(layer)
    if entry is None:
        raise StreamingError(f"{ckpt.dir}: parameter {key!r} of layer {layer} has no expert tensors on disk")
    spec = layout.spec
    if entry.per_expert:
        pieces = []
        novices = set(novice_experts(ckpt.config, str(ckpt.config_path)).get(layer, ()))
        for e in range(target.shape[0]):
            if e in novices:  # a MoNE novice has no weights: zeros, whose output the novice hook replaces
                target[e].zero_()
                continue
            names = [n.removesuffix("_packed") for n in entry.per_expert.get(e, [])]  # NVFP4 as `W.weight`
            row = 0
            for role in roles:
                name = next((n for n in names if ROLE_PATTERNS[role].search(n)), None)
                if name is None:
                    raise StreamingError(f"{ckpt.dir}: layer {layer} expert {e}: no {role} weight on disk "
                                         f"(found {names})")
                rows = dequantized_shape(ckpt, name)[0]
                pieces.append(_piece(ckpt, name, target[e, row:row + rows]))
                row += rows
            if row != target.shape[1]:
                raise StreamingError(f"{ckpt.dir}: layer {layer} expert {e}: {row} rows on disk for {key}, "
                                     f"the model expects {target.shape[1]}")
        return pieces
    pattern = FUSED_GATE_UP if "gate" in roles else FUSED_DOWN
    name = next((n for n in (x.removesuffix("_blocks") for x in entry.fused) if pattern.search(n)), None)
    if name is None:
        raise StreamingError(f"{ckpt.dir}: layer {layer}: no fused tensor on disk for {key} (found {entry.fused})")
    transform = ("t",) if spec.fused_orientation == "in_out" else ()
    if spec.interleaved and "gate" in roles:
        transform += ("deinterleave",)
    return _pieces(ckpt, name, target, transform)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def plan_module(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, layout: MoELayout,
                layer: int | None) -> list[Piece]:
    """Pieces filling every parameter and persistent buffer of `module` (already on its device).
    `layer` None: each name's decoder layer is read from it (`layers.<i>.`). Tensors shared by several names (tied weights) are filled once, from the
    first name that has an on-disk tensor."""
    spec = layout.spec
    by_tensor: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, target in module.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(target), []).append((key, target))
    pieces: list[Piece] = []
    for names in by_tensor.values():
        done = False
        for key, target in names:
            target = target.data
            full = f"{prefix}.{key}" if prefix else key
            index = layer if layer is not None else _layer_of(full)
            fused = memory_fused(key) if index is not None and spec.math.glu_halves else None
            if fused is not None:
                pieces += _fused_pieces(ckpt, layout, index, full, target, fused.roles)
                done = True
                break
            disk = disk_name(ckpt, full, spec.memory_renames)
            if disk is not None:
                pieces += _pieces(ckpt, disk, target)
                done = True
                break
        if not done:
            full = f"{prefix}.{names[0][0]}" if prefix else names[0][0]
            raise StreamingError(f"{ckpt.dir}: no on-disk tensor for parameter {full!r}")
    return pieces


def plain_config(config):
    """`config` without `quantization_config` (a copy; `config` itself when it has none), so that
    `from_config` builds a plain module tree that dequantized weights are read into."""
    import copy

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "quantization_config", None) is None and getattr(text, "quantization_config", None) is None:
        return config
    config = copy.deepcopy(config)
    for cfg in {id(c): c for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else config)
                }.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    return config


def estimate_bytes(ckpt: Checkpoint, dtype: torch.dtype | None) -> int:
    """Bytes the checkpoint's floating tensors take in `dtype` (None: as stored), from the shard headers.
    A quantized weight counts as its dequantized values in `dtype` (bf16 when None); its scales count nothing."""
    names = ckpt.names()
    quantized = {n for n in names if is_quantized(ckpt, n) and not n.endswith(("_scale", "_scales", "_scale_inv"))}
    skip = {c for n in quantized for c in companions(n, ckpt.weight_map)} - quantized
    total = 0
    for name in names:
        if name in skip:
            continue
        if name in quantized:
            logical = name.removesuffix("_blocks").removesuffix("_packed")
            total += int(np.prod(dequantized_shape(ckpt, logical), dtype=np.int64)) * (dtype or torch.bfloat16).itemsize
            continue
        info = ckpt.info(name)
        stored = TORCH_DTYPES.get(info.dtype)
        if dtype is not None and stored is not None and stored.is_floating_point:
            total += info.nbytes // stored.itemsize * dtype.itemsize
        else:
            total += info.nbytes
    return total


def apply_transform(value: torch.Tensor, transform: tuple[str, ...]) -> torch.Tensor:
    for t in transform:
        if t == "t":
            value = value.transpose(-1, -2)
        elif t == "deinterleave":
            value = torch.cat([value[..., 0::2, :], value[..., 1::2, :]], dim=-2)
    return value

