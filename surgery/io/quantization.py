"""Dequantization of the published quantized checkpoint schemes, numpy only, one tensor (or one expert) at a time.

The scheme is read from `quantization_config` in config.json (`scheme_of`) and every weight is decoded
from its own bytes and its companions, found by name (`companions`):

* FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2, Qwen3 -FP8): `quant_method: fp8`, `weight_block_size: [bm, bn]`
  (absent: one scale per tensor). `W.weight` F8_E4M3 [..., R, C] with `W.weight_scale_inv` F32/BF16/F16/F8_E8M0
  [..., ceil(R/bm), ceil(C/bn)] (edge blocks ragged); transformers 5 fused experts name it `X_scale_inv`.
  Value: w * s[r // bm, c // bn].
* compressed-tensors FP8 (`float-quantized`; GLM-4.5-FP8, llm-compressor): `quant_method: compressed-tensors`,
  a config group with `weights: {num_bits: 8, type: float, strategy: channel|tensor|block}`. `W.weight` F8_E4M3
  with `W.weight_scale` F32/BF16/F16: [R, 1] (channel), [1] or [] (tensor), [ceil(R/bm), ceil(C/bn)] (block,
  `block_structure`). Value: w * s.
* NVFP4 (compressed-tensors `nvfp4-pack-quantized`): a config group with `weights: {num_bits: 4, type: float,
  group_size: 16}`. `W.weight_packed` U8 [R, C/2] (two e2m1 codes per byte, low nibble = even column),
  `W.weight_scale` F8_E4M3 [R, C/16], `W.weight_global_scale` F32 [1], a divisor.
  Value: e2m1 * (e4m3(scale) / global_scale).
* MXFP4 (gpt-oss): `quant_method: mxfp4`. `X_blocks` U8 [..., G, 16] (two e2m1 codes per byte, low nibble first)
  with `X_scales` U8 e8m0 [..., G]. Value: e2m1 * 2^(s - 127), 32 values per scale.

Conventions, each checked bit for bit against a reference in tests/test_quantization.py:
* FP8 block and per-channel/per-tensor: the float32 product of the decoded weight and the float32 scale
  (transformers' `Fp8Dequantize` / `_dequantize_fp8_weight` in `integrations/finegrained_fp8.py`).
* MXFP4: transformers' `integrations/mxfp4.py` `convert_moe_packed_tensors` (float32). Its result is the
  transpose [E, H, 2I] of ours: `dequantize` keeps the storage orientation, rows = output features
  ([E, 2I, H] for gate_up, [E, H, I] for down), so a slab is an nn.Linear weight. The e8m0 code 255 (NaN
  in the OCP MX spec) decodes to NaN here; transformers computes 2^128 = inf from it.
* NVFP4: compressed-tensors' reading (`unpack_fp4_from_uint8`: low nibble = even column; `_dequantize`:
  `scale = scale / global_scale` in float32, then code · scale): `weight_global_scale` is a divisor
  (llm-compressor stores 448 · 6 / amax).
F8_E4M3 (e4m3fn: no infinities, 0x7F/0xFF NaN), F8_E5M2 (IEEE-like), F8_E8M0 and e2m1 are decoded through
lookup tables built from their bit definitions, equal to torch's conversions for every code.

Errors are one-line `CheckpointError`s: an unsupported scheme names the scheme and config.json; a missing
or mis-shaped companion, or scales whose block size disagrees with the config, names the tensor and its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np

from surgery.io.checkpoint import Checkpoint
from surgery.io.paths import show
from surgery.io.quant_scheme import SUPPORTED, Scheme, scheme_for, scheme_of
from surgery.io.quant_formats import FLOAT_DTYPES, FP8_TABLES, SCALE_DTYPES, decode_fp8, fp8_block, mxfp4, nvfp4
from surgery.io.safetensors_file import CheckpointError, SafetensorsFile, decode

__all__ = ["SUPPORTED", "Encoded", "Scheme", "Span", "check_quantized", "encoded", "companions", "dequantize", "is_quantized", "scheme_for",
           "scheme_of", "stored_form", "values_shape"]

# ---------------------------------------------------------------------------------------------
# Names

FP8_COMPANIONS = ("_scale_inv", "_scale", "_global_scale", "_zero_point")  # after `<W>.weight`
ACTIVATION_COMPANIONS = ("input_scale", "input_global_scale", "activation_scale", "input_zero_point")


def companions(name: str, names: Collection[str] | None = None) -> list[str]:
    """Tensors that belong with weight `name` (its scales, packed codes, activation scales), under every
    scheme's naming; only those in `names` when given.

    `W.weight` or `W.weight_packed` -> `W.weight_packed`, `W.weight_scale_inv`, `W.weight_scale`,
    `W.weight_global_scale`, `W.weight_zero_point`, `W.input_scale`, ...; MXFP4 `X` or `X_blocks` ->
    `X_blocks`, `X_scales`; any other name `X` -> `X_scale_inv` (transformers' FP8 fused experts).
    """
    if name.endswith(".weight") or name.endswith(".weight_packed"):
        module = name.rsplit(".", 1)[0]
        found = [f"{module}.weight", f"{module}.weight_packed"] + [f"{module}.weight{s}" for s in FP8_COMPANIONS]
        found += [f"{module}.{a}" for a in ACTIVATION_COMPANIONS]
    else:
        base = name.removesuffix("_blocks").removesuffix("_scales")
        found = [base, f"{base}_blocks", f"{base}_scales", f"{base}_scale_inv"]
    found = [n for n in found if n != name]
    return found if names is None else [n for n in found if n in names]


# ---------------------------------------------------------------------------------------------
# Reading


def _where(ckpt: Checkpoint, name: str) -> str:
    return show(ckpt.file_of(name).path)


@dataclass(frozen=True)
class Span:
    """Where a stored tensor (or its slab `index` of axis 0) lies: file, byte range, dtype, shape."""

    file: SafetensorsFile
    begin: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def _span(ckpt: Checkpoint, name: str, index: int | None) -> Span:
    info = ckpt.info(name)
    f = ckpt.file_of(name)
    if index is None:
        return Span(f, info.begin, info.nbytes, info.dtype, tuple(info.shape))
    if not info.shape or not 0 <= index < info.shape[0]:
        raise CheckpointError(f"{_where(ckpt, name)}: tensor {name!r} of shape {list(info.shape)} has no "
                              f"slab {index} on axis 0")
    step = info.nbytes // info.shape[0]
    return Span(f, info.begin + index * step, step, info.dtype, tuple(info.shape[1:]))


def _raw(ckpt: Checkpoint, name: str, index: int | None) -> tuple[bytes, str, tuple[int, ...]]:
    """A tensor's bytes (or those of its `index`-th slab along axis 0), its dtype and that part's shape."""
    span = _span(ckpt, name, index)
    return span.file.read_range(span.begin, span.begin + span.nbytes), span.dtype, span.shape


def _check_dtype(ckpt: Checkpoint, name: str, allowed: tuple[str, ...], role: str) -> None:
    dtype = ckpt.info(name).dtype
    if dtype not in allowed:
        raise CheckpointError(f"{_where(ckpt, name)}: {role} {name!r} is {dtype}; expected {' or '.join(allowed)}")


def _numbers(ckpt: Checkpoint, name: str, index: int | None, allowed: tuple[str, ...], role: str) -> np.ndarray:
    """A float or FP8 tensor (or slab) decoded to float32; its dtype must be one of `allowed`."""
    _check_dtype(ckpt, name, allowed, role)
    raw, dtype, shape = _raw(ckpt, name, index)
    if dtype in FP8_TABLES:
        return decode_fp8(raw, dtype).reshape(shape)
    where = f"{_where(ckpt, name)}: tensor {name!r}"
    return decode(raw, dtype, shape, where=where).astype(np.float32)


def _codes(ckpt: Checkpoint, name: str, index: int | None, role: str,
           allowed: tuple[str, ...] = ("U8",)) -> np.ndarray:
    _check_dtype(ckpt, name, allowed, role)
    raw, _, shape = _raw(ckpt, name, index)
    return np.frombuffer(raw, np.uint8).reshape(shape)


def _companion(ckpt: Checkpoint, weight: str, name: str, scheme: Scheme | None) -> str:
    if name not in ckpt.weight_map:
        label = scheme.name if scheme else "quantized"
        raise CheckpointError(f"{_where(ckpt, weight)}: tensor {weight!r} ({label}) has no companion {name!r}")
    return name


def _shape_error(ckpt: Checkpoint, scale: str, got: tuple, weight: str, wshape: tuple, want: str) -> CheckpointError:
    return CheckpointError(f"{_where(ckpt, scale)}: tensor {scale!r} has shape {list(got)}, but {weight!r} "
                           f"{list(wshape)} needs {want}")


def _no_scheme(ckpt: Checkpoint, scheme: Scheme | None) -> str:
    return scheme.name if scheme else f"no quantization_config in {show(ckpt.config_path)}"


def _fp8_layout(ckpt: Checkpoint, name: str, scale_name: str, scheme: Scheme) -> str:
    """Which scale layout the FP8 weight's scale has ("block", "channel", "tensor"), checked against the
    scheme on the tensors' full shapes (a one-line error when it fits none)."""
    w, s = ckpt.info(name).shape, ckpt.info(scale_name).shape
    lead = w[:-2]
    wants = []
    if "block" in scheme.fp8 and len(w) >= 2:
        want = (*lead, -(-w[-2] // scheme.block[0]), -(-w[-1] // scheme.block[1]))
        if s == want:
            return "block"
        wants.append(f"{list(want)} (weight_block_size {list(scheme.block)} in {scheme.where})")
        if len(s) == len(want) and s[:-2] == lead and all(s[-2:]):
            implied = [-(-w[-2] // s[-2]), -(-w[-1] // s[-1])]
            wants[-1] += f"; the scales fit blocks of about {implied}, the config disagrees"
    if "channel" in scheme.fp8 and len(w) >= 2:
        if s in ((*lead, w[-2], 1), (*lead, w[-2])):
            return "channel"
        wants.append(f"{[*lead, w[-2], 1]} (channel scales, {scheme.name})")
    if "tensor" in scheme.fp8:
        if int(np.prod(s, dtype=np.int64)) == (int(np.prod(lead, dtype=np.int64)) if lead else 1):
            return "tensor"
        wants.append(f"one scale per tensor ([1], {scheme.name})")
    raise _shape_error(ckpt, scale_name, s, name, w, " or ".join(wants))


def fp8_scale(ckpt: Checkpoint, name: str, scheme: Scheme | None) -> tuple[str, str]:
    """(scale tensor name, its layout "block" | "channel" | "tensor") of FP8 weight `name`, checked from the
    headers alone (names, shapes, dtypes)."""
    dtype = ckpt.info(name).dtype
    if scheme is None or not scheme.fp8:
        raise CheckpointError(f"{_where(ckpt, name)}: tensor {name!r} is {dtype}, but the "
                              f"checkpoint's scheme ({_no_scheme(ckpt, scheme)}) has no FP8 weights")
    scale_name = (name + scheme.scale_suffix) if name.endswith(".weight") else f"{name}_scale_inv"
    scale_name = _companion(ckpt, name, scale_name, scheme)
    layout = _fp8_layout(ckpt, name, scale_name, scheme)
    _check_dtype(ckpt, scale_name, SCALE_DTYPES, "scale")
    return scale_name, layout


def _dequant_fp8(ckpt: Checkpoint, name: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
    scale_name, layout = fp8_scale(ckpt, name, scheme)
    weight = _numbers(ckpt, name, index, tuple(FP8_TABLES), "weight")
    scale = _numbers(ckpt, scale_name, index, SCALE_DTYPES, "scale")
    if layout == "block":
        return fp8_block(weight, scale, scheme.block)
    if layout == "channel":
        return (weight * scale.reshape(*weight.shape[:-1], 1)).astype(np.float32, copy=False)
    return (weight * scale.reshape(*weight.shape[:-2], 1, 1)).astype(np.float32, copy=False)


def _nvfp4_parts(ckpt: Checkpoint, module: str, scheme: Scheme | None) -> tuple[str, str, str, int]:
    """An NVFP4 weight's packed codes, scales, global scale and group size, checked from the headers alone."""
    packed_name = f"{module}.weight_packed"
    if scheme is None or scheme.fp4_group is None:
        raise CheckpointError(f"{_where(ckpt, packed_name)}: tensor {packed_name!r} is NVFP4-packed, but the "
                              f"checkpoint's scheme ({_no_scheme(ckpt, scheme)}) declares no 4-bit float weights")
    group = scheme.fp4_group
    scale_name = _companion(ckpt, packed_name, f"{module}.weight_scale", scheme)
    gs_name = _companion(ckpt, packed_name, f"{module}.weight_global_scale", scheme)
    p, s, g = (ckpt.info(n).shape for n in (packed_name, scale_name, gs_name))
    cols = 2 * p[-1] if p else 0
    if len(p) < 2 or cols % group:
        raise CheckpointError(f"{_where(ckpt, packed_name)}: tensor {packed_name!r} of shape {list(p)} holds rows "
                              f"of {cols} values, not a multiple of group_size {group} ({scheme.where})")
    if s != (*p[:-1], cols // group):
        raise _shape_error(ckpt, scale_name, s, packed_name, p, f"{[*p[:-1], cols // group]} (one scale per "
                           f"{group} values, group_size in {scheme.where})")
    lead = int(np.prod(p[:-2], dtype=np.int64)) if len(p) > 2 else 1
    if int(np.prod(g, dtype=np.int64)) != lead:
        raise _shape_error(ckpt, gs_name, g, packed_name, p, "one global scale per matrix ([1])")
    _check_dtype(ckpt, packed_name, ("U8",), "packed weight")
    _check_dtype(ckpt, scale_name, ("F8_E4M3",), "scale")
    _check_dtype(ckpt, gs_name, ("F32", "BF16", "F16"), "global scale")
    return packed_name, scale_name, gs_name, group


def _dequant_nvfp4(ckpt: Checkpoint, module: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
    packed_name, scale_name, gs_name, group = _nvfp4_parts(ckpt, module, scheme)
    packed = _codes(ckpt, packed_name, index, "packed weight")
    scale = _numbers(ckpt, scale_name, index, ("F8_E4M3",), "scale")
    fused = len(ckpt.info(packed_name).shape) > 2
    global_scale = _numbers(ckpt, gs_name, index if fused else None, ("F32", "BF16", "F16"), "global scale")
    divisor = global_scale.reshape(*packed.shape[:-2]) if packed.ndim > 2 else global_scale.ravel()[0]
    return nvfp4(packed, scale, divisor, group)


def _mxfp4_parts(ckpt: Checkpoint, base: str, scheme: Scheme | None) -> tuple[str, str]:
    """An MXFP4 parameter's blocks and scales, checked from the headers alone."""
    blocks_name = f"{base}_blocks"
    if scheme is None or scheme.method != "mxfp4":
        raise CheckpointError(f"{_where(ckpt, blocks_name)}: tensor {blocks_name!r} holds MXFP4 blocks, but the "
                              f"checkpoint's scheme is {_no_scheme(ckpt, scheme)}")
    scales_name = _companion(ckpt, blocks_name, f"{base}_scales", scheme)
    b, s = ckpt.info(blocks_name).shape, ckpt.info(scales_name).shape
    if len(b) < 2 or b[-1] != 16:
        raise CheckpointError(f"{_where(ckpt, blocks_name)}: tensor {blocks_name!r} has shape {list(b)}: blocks of "
                              f"{2 * b[-1] if b else 0} values, MXFP4 uses 32 (16 bytes on the last axis)")
    if s != b[:-1]:
        raise _shape_error(ckpt, scales_name, s, blocks_name, b, f"{list(b[:-1])} (one e8m0 scale per 32-value block)")
    _check_dtype(ckpt, blocks_name, ("U8",), "MXFP4 blocks")
    _check_dtype(ckpt, scales_name, ("U8", "F8_E8M0"), "MXFP4 scales")
    return blocks_name, scales_name


def _dequant_mxfp4(ckpt: Checkpoint, base: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
    blocks_name, scales_name = _mxfp4_parts(ckpt, base, scheme)
    blocks = _codes(ckpt, blocks_name, index, "MXFP4 blocks")
    scales = _codes(ckpt, scales_name, index, "MXFP4 scales", ("U8", "F8_E8M0"))
    return mxfp4(blocks, scales)


_AUTO = object()


def dequantize(ckpt: Checkpoint, name: str, index: int | None = None, scheme: Scheme | None | object = _AUTO
               ) -> np.ndarray:
    """Weight `name` as float32, in its storage orientation (rows = output features for every scheme).

    `name` is the weight as a module sees it: `W.weight` (plain float, or FP8 with its scale; NVFP4
    `W.weight_packed` is found from it), or an MXFP4 parameter `X` (`X_blocks` + `X_scales`; `X_blocks`
    is accepted too). `index` reads only the slab `index` of axis 0 (one expert of a fused tensor) from
    the weight and its companions. Unquantized float tensors are returned exactly (BF16/F16 widened).
    """
    if scheme is _AUTO:
        scheme = scheme_for(ckpt)
    names = ckpt.weight_map
    base = name.removesuffix("_blocks")
    if f"{base}_blocks" in names and base not in names:
        return _dequant_mxfp4(ckpt, base, index, scheme)
    if name.endswith(".weight_packed") or (name.endswith(".weight") and name not in names
                                            and f"{name}_packed" in names):
        return _dequant_nvfp4(ckpt, name.rsplit(".", 1)[0], index, scheme)
    if name not in names:
        raise CheckpointError(f"{show(ckpt.dir)}: no tensor {name!r} (nor its quantized forms) in the checkpoint")
    dtype = ckpt.info(name).dtype
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return _dequant_fp8(ckpt, name, index, scheme)
    return _numbers(ckpt, name, index, FLOAT_DTYPES, "tensor")


@dataclass(frozen=True)
class Encoded:
    """A quantized weight (or one expert slab of it) as stored, for decoders that read the raw bytes
    themselves (surgery.model.dequant, on the device): `form` "fp8-block" | "fp8-channel" | "fp8-tensor" |
    "nvfp4" | "mxfp4", and the spans of its parts: "codes", "scale", and "global_scale" (NVFP4)."""

    form: str
    parts: dict[str, Span]
    block: tuple[int, int] | None = None
    group: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.parts.values())


def encoded(ckpt: Checkpoint, name: str, index: int | None = None) -> Encoded:
    """Where quantized weight `name` (named as `dequantize` takes it; `index`: one slab of axis 0) and its
    companions lie, checked from the headers alone with the same one-line errors as `dequantize`."""
    scheme = scheme_for(ckpt)
    names = ckpt.weight_map
    base = name.removesuffix("_blocks")
    if f"{base}_blocks" in names and base not in names:
        blocks_name, scales_name = _mxfp4_parts(ckpt, base, scheme)
        return Encoded("mxfp4", {"codes": _span(ckpt, blocks_name, index), "scale": _span(ckpt, scales_name, index)})
    if name.endswith(".weight_packed") or (name.endswith(".weight") and name not in names
                                            and f"{name}_packed" in names):
        packed_name, scale_name, gs_name, group = _nvfp4_parts(ckpt, name.rsplit(".", 1)[0], scheme)
        fused = len(ckpt.info(packed_name).shape) > 2
        parts = {"codes": _span(ckpt, packed_name, index), "scale": _span(ckpt, scale_name, index),
                 "global_scale": _span(ckpt, gs_name, index if fused else None)}
        return Encoded("nvfp4", parts, group=group)
    if name not in names or ckpt.info(name).dtype not in ("F8_E4M3", "F8_E5M2"):
        raise CheckpointError(f"{show(ckpt.dir)}: tensor {name!r} is not stored quantized")
    scale_name, layout = fp8_scale(ckpt, name, scheme)
    parts = {"codes": _span(ckpt, name, index), "scale": _span(ckpt, scale_name, index)}
    return Encoded(f"fp8-{layout}", parts, block=scheme.block if layout == "block" else None)


def is_quantized(ckpt: Checkpoint, name: str) -> bool:
    """Whether weight `name` is stored quantized (FP8, NVFP4-packed or MXFP4 blocks) rather than as floats."""
    names = ckpt.weight_map
    if f"{name.removesuffix('_blocks')}_blocks" in names or name.endswith(".weight_packed"):
        return True
    if name.endswith(".weight") and name not in names and f"{name}_packed" in names:
        return True
    return name in names and ckpt.info(name).dtype.startswith("F8_")


SCALE_SUFFIXES = ("_scale", "_scale_inv", "_scales", "_zero_point")  # companions, never weights themselves


def check_quantized(ckpt: Checkpoint) -> Scheme | None:
    """Check every quantized weight of the checkpoint from the shard headers alone, before any compute:
    the scheme in config.json is supported, and each weight's companions are present with the shapes and
    dtypes the scheme gives them. Raises the same one-line `CheckpointError` reading the weight would;
    returns the scheme (None: not quantized)."""
    scheme = scheme_for(ckpt)
    for name in ckpt.weight_map:
        if name.endswith("_blocks"):
            _mxfp4_parts(ckpt, name.removesuffix("_blocks"), scheme)
        elif name.endswith(".weight_packed"):
            _nvfp4_parts(ckpt, name.removesuffix(".weight_packed"), scheme)
        elif ckpt.info(name).dtype in ("F8_E4M3", "F8_E5M2") and not name.endswith(SCALE_SUFFIXES):
            fp8_scale(ckpt, name, scheme)
    return scheme


def stored_form(ckpt: Checkpoint, name: str) -> str | None:
    """How stored tensor `name` holds its values: "fp8" (one FP8 code per value), "fp4" (two e2m1 codes per
    byte, low nibble first: NVFP4 `weight_packed`, MXFP4 `_blocks`), or None (plain floats or anything else)."""
    if name.endswith("_blocks") or name.endswith(".weight_packed"):
        return "fp4" if ckpt.info(name).dtype == "U8" else None
    return "fp8" if ckpt.info(name).dtype in ("F8_E4M3", "F8_E5M2") else None


def values_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    """Shape of the values stored tensor `name` stands for, as `dequantize` returns them: MXFP4 blocks
    [..., G, 16] hold [..., 32·G], NVFP4 packed [..., C/2] holds [..., C], anything else its own shape."""
    shape = ckpt.info(name).shape
    if name.endswith("_blocks") and len(shape) >= 2:
        return (*shape[:-2], shape[-2] * 2 * shape[-1])
    if name.endswith(".weight_packed") and shape:
        return (*shape[:-1], 2 * shape[-1])
    return shape

