"""Dequantization with torch on the tensor's own device, from the raw stored bytes of a weight.

The reader (surgery.model.reader) copies a quantized piece's codes and scales to the device as bytes
(0.5-1 byte per value, through the same pinned ring as bf16 weights) and `decode` turns them into float32
there, so the host never holds float32 values and the decoding runs at device speed. Every step is the
float32 operation surgery.io.quant_formats does in numpy, in the same order (one rounding each: code ·
scale, NVFP4's scale / global_scale first), so the values are bit-identical to
surgery.io.quantization.dequantize (tests/test_device_dequant.py). FP8 codes go through torch's float8
dtypes (equal to our tables for all 256 codes, NaN bits included); e2m1 and e8m0 through our tables.
"""

from __future__ import annotations

import torch

from surgery.io.quant_formats import E2M1_TABLE, E8M0_TABLE
from surgery.io.quantization import Encoded

_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(which: str, device: torch.device) -> torch.Tensor:
    key = (which, device)
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy((E2M1_TABLE if which == "e2m1" else E8M0_TABLE).copy()).to(device)
    return _TABLES[key]


def _floats(raw: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of stored float/FP8/E8M0 bytes (a uint8 tensor), in `shape`."""
    if dtype == "F8_E8M0":
        return _table("e8m0", raw.device)[raw.long()].reshape(shape)
    return raw.view(_FLOATS[dtype]).to(torch.float32).reshape(shape)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes of two e2m1 codes (low nibble first) -> float32 [..., 2n]."""
    table = _table("e2m1", packed.device)
    pair = torch.stack([table[(packed & 0x0F).long()], table[(packed >> 4).long()]], dim=-1)
    return pair.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [..., R, C] times its block's scale: broadcast over whole blocks, a repeated scale when the
    edge blocks are ragged (the same float32 products either way)."""
    rows, cols = weight.shape[-2:]
    (bm, bn), (sr, sc) = block, scale.shape[-2:]
    if rows == sr * bm and cols == sc * bn:
        blocks = weight.reshape(*weight.shape[:-2], sr, bm, sc, bn) * scale[..., :, None, :, None]
        return blocks.reshape(weight.shape)
    s = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight * s


def decode(enc: Encoded, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 values of `enc` (storage orientation, rows = output features) from `raw`, the bytes of each of
    its parts as contiguous uint8 tensors on the device the result is wanted on."""
    codes = enc.parts["codes"]
    if enc.form.startswith("fp8-"):
        weight = _floats(raw["codes"], codes.dtype, codes.shape)
        scale = raw["scale"]
        scale = _floats(scale, enc.parts["scale"].dtype, tuple(enc.parts["scale"].shape))
        if enc.form == "fp8-block":
            return fp8_block(weight, scale, enc.block)
        if enc.form == "fp8-channel":
            return weight * scale.reshape(*weight.shape[:-1], 1)
        return weight * scale.reshape(*weight.shape[:-2], 1, 1)
    packed = raw["codes"].reshape(codes.shape)
    if enc.form == "mxfp4":
        scales = _floats(raw["scale"], "F8_E8M0", enc.parts["scale"].shape)
        values = unpack_e2m1(packed) * scales[..., None]
        return values.reshape(*codes.shape[:-2], codes.shape[-2] * 2 * codes.shape[-1])
    scale = _floats(raw["scale"], "F8_E4M3", enc.parts["scale"].shape)
    gs = enc.parts["global_scale"]
    global_scale = _floats(raw["global_scale"], gs.dtype, gs.shape)
    lead = scale.shape[:-2]
    eff = scale / (global_scale.reshape(*lead, 1, 1) if lead else global_scale.reshape(-1)[0])
    values = unpack_e2m1(packed)
    shape = values.shape
    out = values.reshape(*shape[:-1], shape[-1] // enc.group, enc.group) * eff[..., None]
    return out.reshape(shape)
