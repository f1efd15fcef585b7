"""New float32 values for a quantized checkpoint's weights, written back in the checkpoint's own scheme.

The inverse of surgery.io.quantization: a weight addressed by its plain name (`W.weight` for FP8 and
NVFP4, the fused parameter `X` for MXFP4 `X_blocks`/`X_scales`), its value in storage orientation (rows =
output features, as `dequantize` returns it), re-encoded with fresh scales by the scheme's rules
(surgery.io.quant_formats), under the same tensor names, dtypes and shapes as on disk. Activation
companions (`input_scale`, `input_global_scale`) are not weights and stay as they are.

`plain` is the other way out: the weight as an unquantized tensor that takes the place of its codes,
its scale companions (and activation scales) dropped; `unquantized_config` then lists the modules in
`quantization_config` so that loaders leave them unquantized.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from surgery.io.checkpoint import Checkpoint
from surgery.io.paths import show
from surgery.io.quant_formats import (
    decode_fp8, fp8_block, mxfp4, nvfp4, quantize_fp8, quantize_mxfp4, quantize_nvfp4,
)
from surgery.io.quantization import Scheme, companions, fp8_scale, is_quantized
from surgery.io.safetensors_file import CheckpointError


@dataclass(frozen=True)
class Encoded:
    """One tensor to write: its bytes, and the stored tensors it takes the place of (first: its position;
    empty: the tensor of the same name)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    replaces: tuple[str, ...] = ()


def stored_name(ckpt: Checkpoint, name: str) -> str:
    """The tensor that holds weight `name`'s values (itself, `W.weight_packed` or `X_blocks`)."""
    names = ckpt.weight_map
    if name in names:
        return name
    for cand in (f"{name}_packed", f"{name}_blocks"):
        if cand in names:
            return cand
    raise CheckpointError(f"{show(ckpt.dir)}: no tensor {name!r} (nor its quantized forms) in the checkpoint")


def stored_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    """Weight `name`'s shape as floats, in storage orientation (NVFP4: two values a byte; MXFP4: 32 a block)."""
    stored = stored_name(ckpt, name)
    shape = ckpt.info(stored).shape
    if stored.endswith("_packed"):
        return (*shape[:-1], 2 * shape[-1])
    if stored.endswith("_blocks"):
        return (*shape[:-2], shape[-2] * 2 * shape[-1])
    return shape


def _relative_error(decoded: np.ndarray, value: np.ndarray) -> float:
    norm = float(np.linalg.norm(value.astype(np.float64)))
    diff = float(np.linalg.norm(decoded.astype(np.float64) - value))
    return diff / norm if norm else diff


def encoded_part(ckpt: Checkpoint, name: str, data: np.ndarray | bytes) -> Encoded:
    """Stored tensor `name` with new bytes `data`, which must fill exactly its dtype and shape."""
    info = ckpt.info(name)
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    if len(raw) != info.nbytes:
        raise CheckpointError(f"{show(ckpt.file_of(name).path)}: tensor {name!r} {info.dtype}{list(info.shape)} "
                              f"holds {info.nbytes} bytes; its re-encoding has {len(raw)}")
    return Encoded(name, info.dtype, info.shape, raw)


def _fp8(ckpt: Checkpoint, name: str, value: np.ndarray, scheme: Scheme) -> tuple[list[Encoded], float]:
    scale_name, layout = fp8_scale(ckpt, name, scheme)
    fmt, scale_dtype = ckpt.info(name).dtype, ckpt.info(scale_name).dtype
    codes, scale, scale_bytes = quantize_fp8(value, layout, scheme.block, fmt, scale_dtype)
    weight = decode_fp8(codes, fmt)
    decoded = fp8_block(weight, scale, scheme.block) if layout == "block" else weight * scale
    return [encoded_part(ckpt, name, codes), encoded_part(ckpt, scale_name, scale_bytes)], _relative_error(decoded, value)


def _nvfp4(ckpt: Checkpoint, name: str, value: np.ndarray, scheme: Scheme) -> tuple[list[Encoded], float]:
    module = name.removesuffix(".weight")
    scale_name, gs_name = f"{module}.weight_scale", f"{module}.weight_global_scale"
    for n in (scale_name, gs_name):
        if n not in ckpt.weight_map:
            raise CheckpointError(f"{show(ckpt.file_of(name + '_packed').path)}: tensor {name + '_packed'!r} "
                                  f"({scheme.name}) has no companion {n!r}")
    if ckpt.info(gs_name).dtype != "F32":
        raise CheckpointError(f"{show(ckpt.file_of(gs_name).path)}: tensor {gs_name!r} is "
                              f"{ckpt.info(gs_name).dtype}; heal re-encodes NVFP4 with F32 global scales")
    packed, scale, global_scale = quantize_nvfp4(value, scheme.fp4_group or 16)
    decoded = nvfp4(packed, decode_fp8(scale, "F8_E4M3"), global_scale if value.ndim > 2 else global_scale.ravel()[0],
                    scheme.fp4_group or 16)
    out = [encoded_part(ckpt, f"{name}_packed", packed), encoded_part(ckpt, scale_name, scale),
           encoded_part(ckpt, gs_name, global_scale.astype("<f4"))]
    return out, _relative_error(decoded, value)


def _mxfp4(ckpt: Checkpoint, name: str, value: np.ndarray) -> tuple[list[Encoded], float]:
    scales_name = f"{name}_scales"
    if scales_name not in ckpt.weight_map:
        raise CheckpointError(f"{show(ckpt.file_of(name + '_blocks').path)}: tensor {name + '_blocks'!r} (mxfp4) "
                              f"has no companion {scales_name!r}")
    blocks, scales = quantize_mxfp4(value)
    decoded = mxfp4(blocks, scales)
    return [encoded_part(ckpt, f"{name}_blocks", blocks), encoded_part(ckpt, scales_name, scales)], _relative_error(decoded, value)


def requantize(ckpt: Checkpoint, name: str, value: np.ndarray, scheme: Scheme | None) -> tuple[list[Encoded], float]:
    """Weight `name` (plain name) set to `value` (float32, storage orientation, finite) in the checkpoint's
    scheme: its codes and weight scales, same names/dtypes/shapes; and the relative Frobenius error
    ||dequantized − value|| / ||value|| of the encoding."""
    value = np.asarray(value, np.float32)
    if tuple(value.shape) != stored_shape(ckpt, name):
        raise CheckpointError(f"{show(ckpt.file_of(stored_name(ckpt, name)).path)}: weight {name!r} holds "
                              f"{list(stored_shape(ckpt, name))} values; the new value is {list(value.shape)}")
    stored = stored_name(ckpt, name)
    if stored.endswith("_blocks"):
        return _mxfp4(ckpt, name, value)
    if stored.endswith("_packed"):
        if scheme is None or scheme.fp4_group is None:
            raise CheckpointError(f"{show(ckpt.file_of(stored).path)}: tensor {stored!r} is NVFP4-packed, but "
                                  f"config.json declares no 4-bit float weights")
        return _nvfp4(ckpt, name, value, scheme)
    return _fp8(ckpt, name, value, scheme)


def plain(ckpt: Checkpoint, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> Encoded:
    """Weight `name` written unquantized (`data` in `dtype`, `shape`), in the place of its codes, with its
    scale and activation companions dropped."""
    stored = stored_name(ckpt, name)
    dropped = [n for n in companions(name, ckpt.weight_map) if n != stored]
    return Encoded(name, dtype, shape, data, replaces=(stored, *dropped))


def quantized(ckpt: Checkpoint, name: str) -> bool:
    """Whether weight `name` (plain name) is stored quantized."""
    return is_quantized(ckpt, stored_name(ckpt, name))


def unquantized_config(config: dict, scheme: Scheme, memory_modules: list[str], disk_modules: list[str]
                       ) -> tuple[dict, list[str]]:
    """config.json with modules now stored unquantized left out of quantization: compressed-tensors lists
    the checkpoint's module names in `ignore` (matched by name, as vLLM and compressed-tensors do);
    fp8 and mxfp4 list the model's module names in `modules_to_not_convert` (transformers matches them
    as prefixes, so `model.layers.1.mlp.experts` covers its experts however they are stored).
    Returns the new config and the names listed."""
    out = copy.deepcopy(config)
    holder = out if "quantization_config" in out else out["text_config"]
    qc = holder["quantization_config"]
    key, names = ("ignore", disk_modules) if scheme.method == "compressed-tensors" else \
        ("modules_to_not_convert", memory_modules)
    listed = list(qc.get(key) or [])
    qc[key] = listed + [n for n in dict.fromkeys(names) if n not in listed]
    return out, list(dict.fromkeys(names))


def check_encodable(ckpt: Checkpoint, name: str, scheme: Scheme) -> None:
    """A stored tensor of a quantized weight (its codes or a companion) can be re-encoded: the weight's scale
    companions are there with the shapes the scheme gives them; headers only. Plain tensors pass."""
    if name.endswith(("_scale_inv", ".weight_scale", "_global_scale", "_scales", "input_scale", "_zero_point")):
        return  # a companion: checked with its weight
    if not is_quantized(ckpt, name):
        return
    if name.endswith("_blocks"):
        base = name.removesuffix("_blocks")
        b = ckpt.info(name).shape
        scales = f"{base}_scales"
        if scales not in ckpt.weight_map:
            raise CheckpointError(f"{show(ckpt.file_of(name).path)}: tensor {name!r} (mxfp4) has no companion "
                                  f"{scales!r}")
        if len(b) < 2 or b[-1] != 16 or ckpt.info(scales).shape != b[:-1]:
            raise CheckpointError(f"{show(ckpt.file_of(scales).path)}: tensor {scales!r} has shape "
                                  f"{list(ckpt.info(scales).shape)}, but {name!r} {list(b)} needs {list(b[:-1])} "
                                  "(one e8m0 scale per 32-value block of 16 bytes)")
    elif name.endswith(".weight_packed"):
        _check_nvfp4(ckpt, name, scheme)
    else:
        fp8_scale(ckpt, name, scheme)


def _check_nvfp4(ckpt: Checkpoint, packed: str, scheme: Scheme) -> None:
    module = packed.removesuffix(".weight_packed")
    group = scheme.fp4_group
    if group is None:
        raise CheckpointError(f"{show(ckpt.file_of(packed).path)}: tensor {packed!r} is NVFP4-packed, but "
                              f"{scheme.where} declares no 4-bit float weights ({scheme.name})")
    p = ckpt.info(packed).shape
    lead = int(np.prod(p[:-2], dtype=np.int64)) if len(p) > 2 else 1
    wants = {f"{module}.weight_scale": (*p[:-1], 2 * p[-1] // group) if p else (),
             f"{module}.weight_global_scale": None}
    for n, want in wants.items():
        if n not in ckpt.weight_map:
            raise CheckpointError(f"{show(ckpt.file_of(packed).path)}: tensor {packed!r} ({scheme.name}) has no "
                                  f"companion {n!r}")
        got = ckpt.info(n).shape
        if (want is not None and got != want) or (want is None and int(np.prod(got, dtype=np.int64)) != lead):
            need = list(want) if want is not None else f"{lead} value(s), one global scale per matrix"
            raise CheckpointError(f"{show(ckpt.file_of(n).path)}: tensor {n!r} has shape {list(got)}, but "
                                  f"{packed!r} {list(p)} needs {need}")
