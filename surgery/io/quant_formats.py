"""The element formats of quantized checkpoints (F8_E4M3, F8_E5M2, F8_E8M0, e2m1) as lookup tables built
from their bit layouts, the pure dequantization formulas of each scheme, and their inverses: the
encoders that quantize float32 values by each scheme's published rules (numpy, no checkpoint access).

surgery.io.quantization finds a weight's companions and scheme and calls the decoders;
surgery.io.requantize calls the encoders to write trained weights back in a checkpoint's own scheme.
Every encoder rounds to the nearest code, ties to the even code, saturating at the format's largest
finite value (`round_codes`).
"""

from __future__ import annotations

import numpy as np


def _minifloat_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    """float32 value of every 8-bit code of a 1-sign-bit minifloat (subnormals included).

    `ieee_specials`: the top exponent holds inf/NaN (E5M2); otherwise (E4M3 "fn") only the all-ones
    code is NaN and the top exponent holds normal numbers.
    """
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    frac = man / float(1 << man_bits)
    value = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1.0 + frac) * 2.0 ** (exp - bias))
    top = (1 << exp_bits) - 1
    if ieee_specials:
        value = np.where(exp == top, np.where(man == 0, np.inf, np.nan), value)
    else:
        value = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, value)
    table = (sign * value).astype(np.float32)
    # NaN codes keep their sign and mantissa bits in the float32 payload (quiet bit set), as torch's
    # conversions do, so that every code decodes to the same 32 bits.
    nan = np.isnan(table)
    bits = table.view(np.uint32)
    bits[nan] = ((codes[nan] >> 7) << 31 | 0x7FC00000 | man[nan] << (23 - man_bits)).astype(np.uint32)
    return table


E4M3_TABLE = _minifloat_table(4, 3, 7, ieee_specials=False)  # max 448
E5M2_TABLE = _minifloat_table(5, 2, 15, ieee_specials=True)  # max 57344
E8M0_TABLE = np.array([np.ldexp(np.float32(1.0), c - 127) for c in range(255)] + [0.0], dtype=np.float32)
E8M0_TABLE.view(np.uint32)[255] = 0x7F800001  # code 255 is NaN (torch's float8_e8m0fnu bits)
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)


FP8_TABLES = {"F8_E4M3": E4M3_TABLE, "F8_E5M2": E5M2_TABLE, "F8_E8M0": E8M0_TABLE}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")


def decode_fp8(codes: bytes | np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of F8_E4M3 / F8_E5M2 / F8_E8M0 bytes (same shape as `codes` when an array)."""
    u8 = np.frombuffer(codes, np.uint8) if isinstance(codes, (bytes, bytearray, memoryview)) else codes
    return FP8_TABLES[dtype][np.asarray(u8, np.uint8)]


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """2^(code − 127) as float32 (code 255 = NaN)."""
    return E8M0_TABLE[np.asarray(codes, np.uint8)]


def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    """[..., n] bytes of two e2m1 codes (low nibble first) -> float32 [..., 2n]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.float32)
    out[..., 0::2] = E2M1_TABLE[packed & 0x0F]
    out[..., 1::2] = E2M1_TABLE[packed >> 4]
    return out


def fp8_block(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """weight [..., R, C] times the scale of its (bm × bn) block; edge blocks may be ragged."""
    rows, cols = weight.shape[-2:]
    s = np.repeat(scale, block[0], axis=-2)[..., :rows, :]
    s = np.repeat(s, block[1], axis=-1)[..., :cols]
    return (weight * s).astype(np.float32, copy=False)


def nvfp4(packed: np.ndarray, scale: np.ndarray, global_scale: np.ndarray | float, group: int = 16) -> np.ndarray:
    """[..., R, C/2] packed codes, [..., R, C/group] decoded e4m3 scales and the global divisor (one value,
    or one per leading index) -> [..., R, C]."""
    values = unpack_e2m1(packed)
    lead = scale.shape[:-2]
    gs = np.asarray(global_scale, np.float32).reshape(*lead, 1, 1) if lead else np.float32(global_scale)
    eff = np.asarray(scale, np.float32) / gs
    shape = values.shape
    out = values.reshape(*shape[:-1], shape[-1] // group, group) * eff[..., None]
    return out.reshape(shape).astype(np.float32, copy=False)


def mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., G, B] packed codes and [..., G] e8m0 codes -> float32 [..., G · 2B] (rows unchanged)."""
    with np.errstate(over="ignore"):  # 6 · 2^127 is inf in float32, as in transformers
        values = unpack_e2m1(blocks) * decode_e8m0(scales)[..., None]
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 2 * blocks.shape[-1])



# ---------------------------------------------------------------------------------------------
# Encoders: float32 -> codes and scales, by each scheme's rules

FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
FP4_MAX = 6.0
_FINITE_CODES = {"F8_E4M3": 0x7E, "F8_E5M2": 0x7B, "e2m1": 0x07}  # largest positive finite code
_SIGN_BIT = {"F8_E4M3": 0x80, "F8_E5M2": 0x80, "e2m1": 0x08}
_POSITIVE = {name: (np.arange(top + 1, dtype=np.uint8),
                    (E2M1_TABLE if name == "e2m1" else FP8_TABLES[name])[: top + 1].astype(np.float64))
             for name, top in _FINITE_CODES.items()}


def round_codes(x: np.ndarray, fmt: str) -> np.ndarray:
    """Codes (uint8) of `x` in `fmt` ("F8_E4M3", "F8_E5M2" or "e2m1"): the nearest value, ties to the even
    code (mantissa bit 0 clear), magnitudes beyond the largest finite value saturate to it; the sign bit
    follows signbit(x), so -0.0 keeps its sign as torch's conversions do. `x` must be finite."""
    codes, values = _POSITIVE[fmt]
    x = np.asarray(x, np.float32)
    mag = np.abs(x).astype(np.float64)
    idx = np.searchsorted(values, mag, side="left")
    hi = np.minimum(idx, len(values) - 1)
    lo = np.maximum(idx - 1, 0)
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = np.where(pick_hi, codes[hi], codes[lo]).astype(np.uint8)
    return out | np.where(np.signbit(x), np.uint8(_SIGN_BIT[fmt]), np.uint8(0))


def pack_e2m1(codes: np.ndarray) -> np.ndarray:
    """[..., 2n] 4-bit codes -> [..., n] bytes, the even position in the low nibble (inverse of unpack_e2m1)."""
    codes = np.asarray(codes, np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def round_scale(scale: np.ndarray, dtype: str) -> tuple[np.ndarray, bytes]:
    """A float32 scale as stored in `dtype` (F32, BF16, F16: round to nearest even; F8_E8M0: the next power of
    two up, so that no value overflows): (its float32 value, its little-endian bytes)."""
    s = np.ascontiguousarray(scale, np.float32)
    if dtype == "F32":
        return s, s.tobytes()
    if dtype == "F16":
        h = s.astype(np.float16)
        return h.astype(np.float32), h.tobytes()
    if dtype == "BF16":
        bits = s.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.astype(np.uint32).view(np.float32)
        return value, (bits >> 16).astype("<u2").tobytes()
    if dtype == "F8_E8M0":
        mant, exp = np.frexp(s)
        exp = np.where(mant == 0.5, exp - 1, exp)  # exact powers of two stay
        codes = np.clip(exp + 127, 0, 254).astype(np.uint8)
        return decode_e8m0(codes), codes.tobytes()
    raise ValueError(f"scale dtype {dtype}")


def _amax_scale(amax: np.ndarray, top: float) -> np.ndarray:
    """amax / top, or 1 where a block is all zeros (any scale encodes zeros exactly)."""
    amax = np.asarray(amax, np.float32)
    return np.where(amax > 0, amax / np.float32(top), np.float32(1.0)).astype(np.float32)


def quantize_fp8(w: np.ndarray, layout: str, block: tuple[int, int] | None, fmt: str = "F8_E4M3",
                 scale_dtype: str = "F32") -> tuple[np.ndarray, np.ndarray, bytes]:
    """FP8 weight [..., R, C] by the DeepSeek-V3 / compressed-tensors rule: per block (`layout` "block",
    bm × bn, edge blocks ragged), output row ("channel": [..., R, 1]) or matrix ("tensor": [..., 1, 1]),
    s = amax / fp8 max rounded to `scale_dtype`, codes = fp8(w / s) saturating.
    Returns (codes [..., R, C] uint8, the stored scales as float32, their bytes)."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape[-2:]
    top = FP8_MAX[fmt]
    if layout == "block":
        bm, bn = block
        sr, sc = -(-rows // bm), -(-cols // bn)
        padded = np.zeros((*w.shape[:-2], sr * bm, sc * bn), np.float32)
        padded[..., :rows, :cols] = np.abs(w)
        amax = padded.reshape(*w.shape[:-2], sr, bm, sc, bn).max(axis=(-3, -1))
    elif layout == "channel":
        amax = np.abs(w).max(axis=-1, keepdims=True)
    else:
        amax = np.abs(w).max(axis=(-2, -1), keepdims=True)
    scale, raw = round_scale(_amax_scale(amax, top), scale_dtype)
    full = scale
    if layout == "block":
        full = np.repeat(np.repeat(scale, block[0], axis=-2)[..., :rows, :], block[1], axis=-1)[..., :cols]
    # a scale that underflowed to zero in its dtype decodes every code to 0: write zeros there, not 0/0
    q = np.clip(np.divide(w, full, out=np.zeros(np.broadcast_shapes(w.shape, full.shape), np.float32),
                          where=full != 0), -top, top)
    return round_codes(q, fmt), scale, raw


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX: per 32 values along the last axis, X = 2^(floor(log2 amax) − 2) (e8m0, clamped to ±127),
    codes = e2m1(w / X). [..., C] -> (blocks [..., C/32, 16] uint8, e8m0 scales [..., C/32] uint8)."""
    w = np.asarray(w, np.float32)
    v = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(v).max(axis=-1)
    _, e = np.frexp(amax)  # amax = m · 2^e, m in [0.5, 1): floor(log2 amax) = e − 1, exactly
    exp = np.clip(np.where(amax > 0, e - 1 - 2, -127), -127, 127)
    step = np.ldexp(np.float32(1.0), exp).astype(np.float32)
    codes = round_codes(v / step[..., None], "e2m1")
    return pack_e2m1(codes), (exp + 127).astype(np.uint8)


def quantize_nvfp4(w: np.ndarray, group: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NVFP4 as llm-compressor writes it, per matrix [..., R, C]: global = 448·6 / amax (a divisor, F32),
    per-`group` scale e4m3(amax_group / 6 · global), codes = e2m1(w / (scale / global)).
    Returns (packed [..., R, C/2] uint8, e4m3 scale codes [..., R, C/group], global scale [...] float32)."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape[-2:]
    v = w.reshape(*w.shape[:-1], cols // group, group)
    amax = np.abs(w).max(axis=(-2, -1))
    top = np.float32(FP8_MAX["F8_E4M3"] * FP4_MAX)
    global_scale = np.where(amax > 0, top / np.where(amax > 0, amax, 1), np.float32(1.0)).astype(np.float32)
    gs = global_scale[..., None, None]
    scale = np.minimum(np.abs(v).max(axis=-1) / np.float32(FP4_MAX) * gs, np.float32(FP8_MAX["F8_E4M3"]))
    scale_codes = round_codes(scale, "F8_E4M3")
    eff = (decode_fp8(scale_codes, "F8_E4M3") / gs)[..., None]
    scaled = np.where(eff > 0, v / np.where(eff > 0, eff, 1), np.float32(0.0)).astype(np.float32)
    packed = pack_e2m1(round_codes(scaled, "e2m1").reshape(w.shape))
    return packed, scale_codes, global_scale
