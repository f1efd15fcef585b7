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

import weakref
from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from surgery.io.checkpoint import Checkpoint
from surgery.io.paths import show
from surgery.io.quant_formats import FLOAT_DTYPES, FP8_TABLES, SCALE_DTYPES, decode_fp8, fp8_block, mxfp4, nvfp4
from surgery.io.safetensors_file import CheckpointError, decode

# The scheme, from config.json

SUPPORTED = "fp8 (block-scaled or per-tensor), compressed-tensors (float-quantized FP8, nvfp4-pack-quantized), mxfp4"


@dataclass(frozen=True)
class Scheme:
    """What `quantization_config` says, reduced to what decoding needs."""

    method: str  # "fp8" | "compressed-tensors" | "mxfp4"
    where: str  # config.json, for messages
    fp8: frozenset[str] = frozenset()  # FP8 weight scale layouts allowed: "block", "channel", "tensor"
    block: tuple[int, int] | None = None  # FP8 block size (weight_block_size / block_structure)
    fp4_group: int | None = None  # NVFP4 group size
    ignore: tuple[str, ...] = field(default=())  # modules_to_not_convert / ignore, as written

    @property
    def scale_suffix(self) -> str:
        """The FP8 weight's scale: `weight_scale_inv` (fp8) or `weight_scale` (compressed-tensors)."""
        return "_scale_inv" if self.method == "fp8" else "_scale"

    @property
    def name(self) -> str:
        """e.g. `fp8 block [128, 128]`, `compressed-tensors FP8 channel`, `compressed-tensors NVFP4 group 16`."""
        if self.method == "mxfp4":
            return "mxfp4"
        if self.method == "fp8":
            return f"fp8 block {list(self.block)}" if self.block else "fp8 per-tensor"
        parts = []
        if self.fp8:
            parts.append("FP8 " + "/".join(sorted(self.fp8)) + (f" {list(self.block)}" if self.block else ""))
        if self.fp4_group:
            parts.append(f"NVFP4 group {self.fp4_group}")
        return "compressed-tensors " + " + ".join(parts)


def _block_size(value: object, key: str, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and v > 0 for v in value)):
        raise CheckpointError(f"{where}: quantization_config.{key} must be two positive integers, not {value!r}")
    return value[0], value[1]


def _compressed_tensors(qc: dict, where: str) -> Scheme:
    top_format = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    fp8: set[str] = set()
    block = None
    fp4_group = None
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if weights is None:
            continue  # activation-only group
        if not isinstance(weights, dict):
            raise CheckpointError(f"{where}: compressed-tensors config group {gname!r}: weights is not an object")
        fmt = group.get("format") or top_format
        bits, number, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
        desc = f"{bits}-bit {number} {strategy} (format {fmt!r})"
        if bits == 8 and number == "float" and fmt in ("float-quantized", "naive-quantized") \
                and strategy in ("channel", "tensor", "block"):
            fp8.add(strategy)
            if strategy == "block":
                block = _block_size(weights.get("block_structure"), f"config_groups.{gname}.weights.block_structure",
                                    where)
        elif bits == 4 and number == "float" and fmt == "nvfp4-pack-quantized":
            g = weights.get("group_size", 16)
            if type(g) is not int or g <= 0:
                raise CheckpointError(f"{where}: compressed-tensors config group {gname!r}: group_size {g!r}")
            fp4_group = g
        else:
            raise CheckpointError(f"{where}: compressed-tensors scheme {desc} in config group {gname!r} is not "
                                  f"supported (supported: {SUPPORTED})")
    if not fp8 and fp4_group is None:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config quantizes no weights")
    ignore = qc.get("ignore") or []
    return Scheme("compressed-tensors", where, frozenset(fp8), block, fp4_group,
                  tuple(str(x) for x in ignore) if isinstance(ignore, list) else ())


def scheme_of(config: dict, where: str = "config.json") -> Scheme | None:
    """The checkpoint's quantization scheme (None when config.json has no `quantization_config`)."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    ignore = qc.get("modules_to_not_convert") or []
    ignore = tuple(str(x) for x in ignore) if isinstance(ignore, list) else ()
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "e5m2"):
            raise CheckpointError(f"{where}: fp8 quantization with fmt {fmt!r} is not supported (e4m3, e5m2)")
        if qc.get("weight_block_size") is None:
            return Scheme("fp8", where, frozenset({"tensor"}), None, ignore=ignore)
        return Scheme("fp8", where, frozenset({"block"}), _block_size(qc["weight_block_size"], "weight_block_size",
                                                                         where), ignore=ignore)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "mxfp4":
        return Scheme("mxfp4", where, ignore=ignore)
    raise CheckpointError(f"{where}: quantization scheme quant_method={method!r} is not supported "
                          f"(supported: {SUPPORTED})")


_SCHEMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scheme_for(ckpt: Checkpoint) -> Scheme | None:
    """`scheme_of` the checkpoint's config.json, parsed once per open Checkpoint."""
    if ckpt not in _SCHEMES:
        _SCHEMES[ckpt] = (scheme_of(ckpt.config, show(ckpt.config_path)),)
    return _SCHEMES[ckpt][0]


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


def _raw(ckpt: Checkpoint, name: str, index: int | None) -> tuple[bytes, str, tuple[int, ...]]:
    """A tensor's bytes (or those of its `index`-th slab along axis 0), its dtype and that part's shape."""
    info = ckpt.info(name)
    f = ckpt.file_of(name)
    if index is None:
        return f.read_bytes(name), info.dtype, info.shape
    if not info.shape or not 0 <= index < info.shape[0]:
        raise CheckpointError(f"{_where(ckpt, name)}: tensor {name!r} of shape {list(info.shape)} has no "
                              f"slab {index} on axis 0")
    step = info.nbytes // info.shape[0]
    begin = info.begin + index * step
    return f.read_range(begin, begin + step), info.dtype, info.shape[1:]


def _numbers(ckpt: Checkpoint, name: str, index: int | None, allowed: tuple[str, ...], role: str) -> np.ndarray:
    """A float or FP8 tensor (or slab) decoded to float32; its dtype must be one of `allowed`."""
    raw, dtype, shape = _raw(ckpt, name, index)
    if dtype not in allowed:
        raise CheckpointError(f"{_where(ckpt, name)}: {role} {name!r} is {dtype}; expected {' or '.join(allowed)}")
    if dtype in FP8_TABLES:
        return decode_fp8(raw, dtype).reshape(shape)
    where = f"{_where(ckpt, name)}: tensor {name!r}"
    return decode(raw, dtype, shape, where=where).astype(np.float32)


def _codes(ckpt: Checkpoint, name: str, index: int | None, role: str,
           allowed: tuple[str, ...] = ("U8",)) -> np.ndarray:
    raw, dtype, shape = _raw(ckpt, name, index)
    if dtype not in allowed:
        raise CheckpointError(f"{_where(ckpt, name)}: {role} {name!r} is {dtype}; expected {' or '.join(allowed)}")
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
    """(scale tensor name, its layout "block" | "channel" | "tensor") of FP8 weight `name`, checked."""
    if scheme is None or not scheme.fp8:
        raise CheckpointError(f"{_where(ckpt, name)}: tensor {name!r} is {ckpt.info(name).dtype}, but the "
                              f"checkpoint's scheme ({_no_scheme(ckpt, scheme)}) has no FP8 weights")
    scale_name = (name + scheme.scale_suffix) if name.endswith(".weight") else f"{name}_scale_inv"
    scale_name = _companion(ckpt, name, scale_name, scheme)
    return scale_name, _fp8_layout(ckpt, name, scale_name, scheme)


def _dequant_fp8(ckpt: Checkpoint, name: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
    scale_name, layout = fp8_scale(ckpt, name, scheme)
    weight = _numbers(ckpt, name, index, tuple(FP8_TABLES), "weight")
    scale = _numbers(ckpt, scale_name, index, SCALE_DTYPES, "scale")
    if layout == "block":
        return fp8_block(weight, scale, scheme.block)
    if layout == "channel":
        return (weight * scale.reshape(*weight.shape[:-1], 1)).astype(np.float32, copy=False)
    return (weight * scale.reshape(*weight.shape[:-2], 1, 1)).astype(np.float32, copy=False)


def _dequant_nvfp4(ckpt: Checkpoint, module: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
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
    packed = _codes(ckpt, packed_name, index, "packed weight")
    scale = _numbers(ckpt, scale_name, index, ("F8_E4M3",), "scale")
    global_scale = _numbers(ckpt, gs_name, index if len(p) > 2 else None, ("F32", "BF16", "F16"), "global scale")
    divisor = global_scale.reshape(*packed.shape[:-2]) if packed.ndim > 2 else global_scale.ravel()[0]
    return nvfp4(packed, scale, divisor, group)


def _dequant_mxfp4(ckpt: Checkpoint, base: str, index: int | None, scheme: Scheme | None) -> np.ndarray:
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


def is_quantized(ckpt: Checkpoint, name: str) -> bool:
    """Whether weight `name` is stored quantized (FP8, NVFP4-packed or MXFP4 blocks) rather than as floats."""
    names = ckpt.weight_map
    if f"{name.removesuffix('_blocks')}_blocks" in names or name.endswith(".weight_packed"):
        return True
    if name.endswith(".weight") and name not in names and f"{name}_packed" in names:
        return True
    return name in names and ckpt.info(name).dtype.startswith("F8_")
