"""Masks: which weights of one expert matrix to zero, and the zeroing of their stored bits.

Scores follow MoE-Pruner (arXiv 2410.12013): S_rc = |W_rc| * sqrt(sum_t r g^2 x_c^2), the input
channel's norm over the tokens routed to the expert, weighted by the router's gate; Wanda drops
the gate (sum_t r x_c^2); magnitude uses |W_rc| alone. The comparison group is each output row,
so every expert matrix gets the same sparsity. N:M keeps the N best of every M consecutive inputs.
Kept weights keep their exact bits (masking zeroes the stored integers), so bf16 stays bit-exact; quantized
weights (FP8, NVFP4, MXFP4) are scored on their dequantized values and pruned by zeroing their codes, scales kept.
"""

from __future__ import annotations

import math
import re
from typing import Iterator

import numpy as np

from surgery.errors import UserError
from surgery.io import SafetensorsFile, TensorInfo, decode

METHODS = ("moe-pruner", "wanda", "magnitude")
# Float dtypes and the unsigned integer of the same width: zeroing those integers zeroes the weight.
BITS_DTYPES = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}
ROW_BLOCK = 1024  # rows scored at once: bounds the float32 workspace for very wide experts


class SparsifyError(UserError):
    """Bad sparsify input: options, statistics that do not fit, or weights that cannot be masked."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) from "N:M" with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise SparsifyError(f"pattern {pattern!r}: use unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)")
    return int(m[1]), int(m[2])


def check_sparsity(sparsity: float | None, pattern: str) -> float:
    """The sparsity to apply: N:M fixes it at 1 - N/M, so a different value is a contradiction."""
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
            raise SparsifyError(f"pattern {pattern} means sparsity {implied:g}, not {sparsity:g}")
        return implied
    if sparsity is None:
        raise SparsifyError("unstructured sparsity needs --sparsity S (a fraction in [0, 1)), or give an N:M --pattern")
    if not 0 <= sparsity < 1:
        raise SparsifyError(f"unstructured sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def _prune_lowest(score: np.ndarray, k: int) -> np.ndarray:
    """True for the k lowest scores along the last axis; ties go to the lower index (as a stable sort).

    A partition finds each group's k-th score in linear time; a full sort of every row would
    dominate the run time on large experts.
    """
    if k == 0:
        return np.zeros(score.shape, dtype=bool)
    kth = np.partition(score, k - 1, axis=-1)[..., k - 1: k]
    below = score < kth
    tie = score == kth
    room = k - below.sum(axis=-1, keepdims=True)
    return below | (tie & (np.cumsum(tie, axis=-1) <= room))


def row_mask(weight: np.ndarray, channel_norm: np.ndarray | None, sparsity: float, pattern: str) -> np.ndarray:
    """Keep-mask (True = weight survives) of a [out, in] matrix, scored |W| * channel_norm per output row.

    Unstructured prunes round(sparsity * in) weights of every row; N:M prunes M - N of every M
    consecutive inputs. channel_norm is None for magnitude pruning.
    """
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, pattern)
    rows, cols = weight.shape
    score = np.abs(weight.astype(np.float32, copy=False))
    if channel_norm is not None:
        if channel_norm.shape != (cols,):
            raise SparsifyError(f"channel norms have shape {list(channel_norm.shape)}, the matrix has {cols} inputs")
        score = score * channel_norm.astype(np.float32)[None, :]
    if nm is None:
        return ~_prune_lowest(score, math.floor(sparsity * cols + 0.5))
    n, m = nm
    if cols % m:
        raise SparsifyError(f"pattern {pattern}: {cols} inputs are not a multiple of {m}")
    return ~_prune_lowest(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def mask_matrix(raw: bytes, dtype: str, shape: tuple[int, ...], input_axis: int, norm: np.ndarray | None,
                 sparsity: float, pattern: str) -> tuple[bytes, int]:
    """Masked bytes of one stored matrix (inputs on `input_axis`) and its number of zero weights."""
    bits = np.frombuffer(raw, dtype=BITS_DTYPES[dtype]).reshape(shape).copy()
    values = decode(raw, dtype, shape)
    if input_axis == 0:
        bits, values = bits.T, values.T
    for r0 in range(0, bits.shape[0], ROW_BLOCK):
        keep = row_mask(values[r0: r0 + ROW_BLOCK], norm, sparsity, pattern)
        bits[r0: r0 + ROW_BLOCK][~keep] = 0
    magnitude_bits = np.iinfo(bits.dtype).max >> 1  # every bit but the sign: ±0 both count as zero
    zeros = int(np.count_nonzero((bits & magnitude_bits) == 0))
    return (bits.T if input_axis == 0 else bits).tobytes(), zeros


def mask_codes(raw: bytes, form: str, values: np.ndarray, norm: np.ndarray | None, sparsity: float,
               pattern: str) -> tuple[bytes, int]:
    """Masked bytes of one quantized matrix and its number of zero values, scored on `values` [out, in]
    (its dequantized values): each pruned value's code becomes the format's +0 (FP8 0x00; the e2m1 nibble 0
    of `form` "fp4", low nibble = even input), so it dequantizes to 0 whatever its scale; kept codes and
    every scale are untouched, so kept values dequantize exactly as before."""
    rows, cols = values.shape
    width = cols if form == "fp8" else cols // 2
    if len(raw) != rows * width or (form == "fp4" and cols % 2):
        raise SparsifyError(f"{len(raw)} bytes of {form} codes cannot hold a [{rows}, {cols}] matrix")
    codes = np.frombuffer(raw, dtype=np.uint8).reshape(rows, width).copy()
    for r0 in range(0, rows, ROW_BLOCK):
        keep = row_mask(values[r0: r0 + ROW_BLOCK], norm, sparsity, pattern)
        part = codes[r0: r0 + ROW_BLOCK]  # a view: masked in place
        if form == "fp8":
            part[~keep] = 0
        else:
            part &= (np.where(keep[:, 0::2], 0x0F, 0) | np.where(keep[:, 1::2], 0xF0, 0)).astype(np.uint8)
    if form == "fp8":
        zeros = int(np.count_nonzero((codes & 0x7F) == 0))  # ±0
    else:
        zeros = int(np.count_nonzero((codes & 0x07) == 0) + np.count_nonzero((codes & 0x70) == 0))
    return codes.tobytes(), zeros


def slabs(f: SafetensorsFile, info: TensorInfo, count: int) -> Iterator[bytes]:
    """The tensor's bytes in `count` equal slabs along axis 0, one read each."""
    size = info.nbytes // count
    for i in range(count):
        yield f.read_range(info.begin + i * size, info.begin + (i + 1) * size)
