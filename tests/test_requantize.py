"""The encoders of surgery.io.quant_formats against independent references: torch's own float8 and bfloat16
conversions (round to nearest even), a brute-force nearest e2m1 value, and the exact exponent rule of MXFP4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.io.quant_formats import (
    E2M1_TABLE, decode_e8m0, decode_fp8, quantize_mxfp4, round_codes, round_scale, unpack_e2m1,
)


def _values(top: float, seed: int = 0) -> np.ndarray:
    """Random magnitudes over the whole range (subnormals included), every exact code value and every midpoint."""
    rng = np.random.default_rng(seed)
    x = np.exp(rng.uniform(np.log(1e-5), np.log(top), 4000)).astype(np.float32)
    return np.concatenate([x, -x, [0.0, -0.0]]).astype(np.float32)


@pytest.mark.parametrize("fmt,torch_dtype,top", [("F8_E4M3", torch.float8_e4m3fn, 448.0),
                                                 ("F8_E5M2", torch.float8_e5m2, 57344.0)])
def test_fp8_codes_equal_torch_round_to_nearest_even(fmt: str, torch_dtype, top: float) -> None:
    codes = np.arange(256, dtype=np.uint8)
    exact = decode_fp8(codes, fmt)
    finite = np.sort(np.unique(np.abs(exact[np.isfinite(exact)])))
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)  # exact ties in float32
    x = np.concatenate([_values(top), finite, -finite, mids, -mids]).astype(np.float32)
    ours = round_codes(x, fmt)
    theirs = torch.from_numpy(x).to(torch_dtype).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs)
    assert round_codes(np.float32([1e6, -1e6]), fmt).tolist() == round_codes(np.float32([top, -top]), fmt).tolist()


def test_e2m1_codes_are_the_nearest_value_ties_to_even() -> None:
    grid = [float(v) for v in E2M1_TABLE[:8]]
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])]
    x = np.float32([*np.linspace(0, 7, 701), *mids, 100.0])
    x = np.concatenate([x, -x, np.float32([-0.0])])
    codes = round_codes(x, "e2m1")
    for value, code in zip(x.tolist(), codes.tolist()):
        mag = min(abs(value), 6.0)
        want = min(range(8), key=lambda i: (abs(mag - grid[i]), i % 2))  # nearest, ties to the even code
        assert code == want | (8 if np.signbit(value) else 0), value


def test_scales_round_like_their_dtypes() -> None:
    s = np.abs(_values(1e3, seed=1)) + np.float32(1e-6)
    value, raw = round_scale(s, "BF16")
    theirs = torch.from_numpy(s).to(torch.bfloat16)
    assert raw == theirs.view(torch.uint8).numpy().tobytes() and np.array_equal(value, theirs.float().numpy())
    value, raw = round_scale(s, "F8_E8M0")
    assert (value >= s).all() and (value < 2 * s).all()
    assert np.array_equal(decode_e8m0(np.frombuffer(raw, np.uint8)), value)


def test_mxfp4_exponent_is_exact_below_a_power_of_two() -> None:
    """amax just below 4: floor(log2 amax) = 1, so X = 2^-1 (float32 log2 would round up to 2)."""
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = np.nextafter(np.float32(4.0), np.float32(0.0))
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[127 - 1]]
    assert unpack_e2m1(blocks)[0, 0, 0] == 6.0  # 3.9999998 / 0.5 = 7.9999996 saturates at 6
