"""The element formats of quantized checkpoints (F8_E4M3, F8_E5M2, F8_E8M0, e2m1) as lookup tables built
from their bit layouts, and the pure dequantization formulas of each scheme (numpy, no checkpoint access).

surgery.io.quantization finds a weight's companions and scheme and calls these.
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

