"""MXFP4 and FP8 encoding with torch on the value's own device: the inverse of surgery.model.dequant.

`heal` writes trained weights back in the student's scheme. The numpy encoders (surgery.io.quant_formats)
round through a sorted-table search at 5–9M values/s on one core, so re-encoding the 14B expert values
of a gpt-oss-20b student took longer than its whole distillation. These encoders do the same float32
operations in the same order on the GPU (or with torch's CPU threads), so codes and scales are
bit-identical to the numpy ones (tests/test_quant_encode.py): e2m1 codes by counting the midpoints a
magnitude passes (> where the tie goes to the lower, even code; >= where it goes to the upper one), FP8
codes through torch's float8 dtypes (round to nearest even, after the same saturating clip); NVFP4 as
both together (e4m3 group scales, e2m1 codes).
"""

from __future__ import annotations

import torch

from surgery.io.checkpoint import Checkpoint
from surgery.io.quantization import Scheme, fp8_scale
from surgery.io.quant_formats import FP4_MAX, FP8_MAX
from surgery.io.requantize import Encoded, encoded_part, stored_name
from surgery.model.dequant import fp8_block, unpack_e2m1

_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SCALES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: the midpoints between codes k and k + 1, and whether a tie
# goes up (k odd: k + 1 is the even code)
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes of finite float32 `x`: nearest, ties to the even code, saturating at 6, sign bit 0x08
    from the sign bit of x (so -0.0 keeps it), as surgery.io.quant_formats.round_codes."""
    mag = x.abs()
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for point, tie_up in _E2M1_MIDPOINTS:
        codes += (mag >= point if tie_up else mag > point).to(torch.uint8)
    return codes | (torch.signbit(x).to(torch.uint8) << 3)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX as surgery.io.quant_formats.quantize_mxfp4: [..., C] float32 -> (blocks [..., C/32, 16] uint8,
    e8m0 scales [..., C/32] uint8)."""
    v = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = v.abs().amax(dim=-1)
    # floor(log2 amax) - 2 from the exponent bits (amax = 0 and subnormals clamp to -127, as numpy's frexp)
    exp = (((amax.view(torch.int32) >> 23) & 0xFF) - 129).clamp(-127, 127)
    codes = e2m1_codes(v / _power_of_two(exp)[..., None])
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def quantize_nvfp4(w: torch.Tensor, group: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As surgery.io.quant_formats.quantize_nvfp4, per matrix [..., R, C]: (packed [..., R, C/2] uint8, e4m3
    scale codes [..., R, C/group] uint8, global scale [...] float32)."""
    w = w.float()
    v = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    amax = w.abs().amax(dim=(-2, -1))
    global_scale = torch.where(amax > 0, _const(FP8_MAX["F8_E4M3"] * FP4_MAX, w) / torch.where(amax > 0, amax, 1.0), 1.0)
    gs = global_scale[..., None, None]
    scale = torch.minimum(v.abs().amax(dim=-1) / _const(FP4_MAX, w) * gs, _const(FP8_MAX["F8_E4M3"], w))
    scale_codes = scale.to(torch.float8_e4m3fn)
    eff = (scale_codes.float() / gs)[..., None]
    scaled = torch.where(eff > 0, v / torch.where(eff > 0, eff, 1.0), 0.0)
    codes = e2m1_codes(scaled).reshape(w.shape)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale_codes.view(torch.uint8), global_scale


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on `like`'s device. Not a CPU scalar: CUDA divides by a CPU scalar as a multiplication
    by its reciprocal, which is not numpy's correctly rounded quotient (F32 scales differed in the last bit)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _power_of_two(exp: torch.Tensor) -> torch.Tensor:
    """2^exp in float32, exactly, for integer exp in [-127, 127] (2^-127 is subnormal)."""
    bits = torch.where(exp >= -126, (exp + 127) << 23, torch.full_like(exp, 0x00400000))
    return bits.to(torch.int32).view(torch.float32)


def _round_scale(scale: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scale as stored, back in float32; its stored form) for F32, BF16 or F16 scales."""
    stored = scale.to(_SCALES[dtype])
    return stored.float(), stored


def quantize_fp8(w: torch.Tensor, layout: str, block: tuple[int, int] | None, fmt: str, scale_dtype: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As surgery.io.quant_formats.quantize_fp8: (codes [..., R, C] uint8, scales in float32, scales as stored)."""
    w = w.float()
    rows, cols = w.shape[-2:]
    top = FP8_MAX[fmt]
    if layout == "block":
        bm, bn = block
        sr, sc = -(-rows // bm), -(-cols // bn)
        padded = w.new_zeros((*w.shape[:-2], sr * bm, sc * bn))
        padded[..., :rows, :cols] = w.abs()
        amax = padded.reshape(*w.shape[:-2], sr, bm, sc, bn).amax(dim=(-3, -1))
    elif layout == "channel":
        amax = w.abs().amax(dim=-1, keepdim=True)
    else:
        amax = w.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / _const(top, w), torch.ones_like(amax))
    scale, stored = _round_scale(scale, scale_dtype)
    full = scale
    if layout == "block":
        full = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    q = torch.where(full != 0, w / full, 0.0).clamp(-top, top)  # as numpy: zeros under a zero scale
    return q.to(_FP8[fmt]).view(torch.uint8), scale, stored


def _relative_error(decoded: torch.Tensor, value: torch.Tensor) -> float:
    """||decoded − value|| / ||value||, summed in float64 (no float64 copy of a layer's weights)."""
    norm = float(torch.linalg.vector_norm(value, dtype=torch.float64))
    diff = float(torch.linalg.vector_norm(decoded - value, dtype=torch.float64))
    return diff / norm if norm else diff


def requantize_on_device(ckpt: Checkpoint, name: str, value: torch.Tensor, scheme: Scheme | None
                         ) -> tuple[list[Encoded], float] | None:
    """As surgery.io.requantize.requantize for MXFP4 and FP8 weights, computed where `value` lies (float,
    storage orientation, finite, shape already checked); None for what is left to numpy (E8M0 scales, and
    what it checks and refuses)."""
    stored = stored_name(ckpt, name)
    if stored.endswith("_blocks"):
        blocks, scales = quantize_mxfp4(value)
        decoded = (unpack_e2m1(blocks) * _power_of_two(scales.int() - 127)[..., None]).reshape(value.shape)
        parts = [encoded_part(ckpt, stored, _bytes(blocks)), encoded_part(ckpt, f"{name}_scales", _bytes(scales))]
        return parts, _relative_error(decoded, value)
    if stored.endswith("_packed"):
        return _nvfp4(ckpt, name, value, scheme)
    scale_name, layout = fp8_scale(ckpt, name, scheme)
    fmt, scale_dtype = ckpt.info(name).dtype, ckpt.info(scale_name).dtype
    if scale_dtype not in _SCALES:  # F8_E8M0 scales: numpy's power-of-two rounding
        return None
    codes, scale, stored_scale = quantize_fp8(value, layout, scheme.block, fmt, scale_dtype)
    weight = codes.view(_FP8[fmt]).float()
    if layout == "block":
        decoded = fp8_block(weight, scale, scheme.block)
    else:
        decoded = weight * scale
    return [encoded_part(ckpt, name, _bytes(codes)), encoded_part(ckpt, scale_name, _bytes(stored_scale))], \
        _relative_error(decoded, value)


def _nvfp4(ckpt: Checkpoint, name: str, value: torch.Tensor, scheme: Scheme | None
           ) -> tuple[list[Encoded], float] | None:
    module = name.removesuffix(".weight")
    scale_name, gs_name = f"{module}.weight_scale", f"{module}.weight_global_scale"
    if scheme is None or scheme.fp4_group is None or gs_name not in ckpt.weight_map \
            or scale_name not in ckpt.weight_map or ckpt.info(gs_name).dtype != "F32":
        return None  # numpy's path names the problem
    group = scheme.fp4_group
    packed, scale_codes, global_scale = quantize_nvfp4(value, group)
    eff = scale_codes.view(torch.float8_e4m3fn).float() / global_scale[..., None, None]
    values = unpack_e2m1(packed)
    decoded = (values.reshape(*values.shape[:-1], -1, group) * eff[..., None]).reshape(value.shape)
    return [encoded_part(ckpt, f"{name}_packed", _bytes(packed)), encoded_part(ckpt, scale_name, _bytes(scale_codes)),
            encoded_part(ckpt, gs_name, _bytes(global_scale))], _relative_error(decoded, value)


def _bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor (through the host)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
