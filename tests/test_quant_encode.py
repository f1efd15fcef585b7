"""The torch encoders heal uses (surgery.model.quant_encode) give the numpy encoders' codes and scales bit for
bit, on values chosen to hit every rounding case, and on the weights of tiny checkpoints in each scheme."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.io import Checkpoint
from surgery.io.quant_formats import quantize_fp8, quantize_mxfp4, quantize_nvfp4
from surgery.io.quantization import dequantize, scheme_for
from surgery.io.requantize import requantize
from surgery.model import quant_encode
from quantized_models import deepseek_fp8, glm_ct_fp8, gpt_oss_mxfp4, qwen3_fp8, qwen3_nvfp4


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU host: where heal encodes


def _on(w: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(w).to(device)


def _values(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Rows at very different scales (down to subnormal), an all-zero block, a block of -0.0, and a block of
    every e2m1 midpoint and code value (ties) at a power-of-two scale."""
    rng = np.random.default_rng(seed)
    scales = rng.choice(np.float32([1e-40, 1e-20, 1e-3, 1.0, 300.0, 3e30]), size=(shape[0], 1))
    w = (rng.standard_normal(shape) * scales).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = -0.0
    ties = [0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.9]
    w[2, :32] = np.float32(ties + [-t for t in ties]) * np.float32(0.5)  # amax 3.95: step 0.5
    return w


@pytest.mark.parametrize("device", DEVICES)
def test_mxfp4_codes_and_scales_equal_numpy(device: str) -> None:
    w = _values((48, 256))
    blocks, scales = quantize_mxfp4(w)
    t_blocks, t_scales = quant_encode.quantize_mxfp4(_on(w, device))
    assert np.array_equal(t_blocks.cpu().numpy(), blocks) and np.array_equal(t_scales.cpu().numpy(), scales)


@pytest.mark.parametrize("shape", [(48, 256), (3, 16, 64)])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_codes_and_scales_equal_numpy(shape: tuple[int, ...], seed: int, device: str) -> None:
    """One matrix with rows from 1e-40 to 3e30 (group scales that underflow, saturate at 448), and a stack of
    matrices each with its own global scale, one of them all zeros."""
    w = _values((int(np.prod(shape[:-1])), shape[-1]), seed).reshape(shape)
    if len(shape) == 3:
        w[1] = 0.0
    want = quantize_nvfp4(w)
    got = quant_encode.quantize_nvfp4(_on(w, device))
    for g, n in zip(got, want):
        n = np.asarray(n)
        assert g.dtype == torch.from_numpy(n).dtype and tuple(g.shape) == n.shape
        assert g.contiguous().cpu().numpy().tobytes() == np.ascontiguousarray(n).tobytes()


@pytest.mark.parametrize("fmt", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("layout,block", [("block", (16, 48)), ("channel", None), ("tensor", None)])
@pytest.mark.parametrize("device", DEVICES)
def test_fp8_codes_and_scales_equal_numpy(fmt: str, scale_dtype: str, layout: str, block, device: str) -> None:
    w = _values((40, 250), seed=1)  # 250 columns: ragged edge blocks
    codes, _, raw = quantize_fp8(w, layout, block, fmt, scale_dtype)
    t_codes, _, t_stored = quant_encode.quantize_fp8(_on(w, device), layout, block, fmt, scale_dtype)
    assert np.array_equal(t_codes.cpu().numpy(), codes)
    assert t_stored.contiguous().cpu().view(torch.uint8).numpy().tobytes() == raw


@pytest.mark.parametrize("build", [deepseek_fp8, qwen3_fp8, glm_ct_fp8, gpt_oss_mxfp4, qwen3_nvfp4])
@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_weights_encode_as_numpy_does(tmp_path: Path, build, device: str) -> None:
    """Every quantized expert weight of a tiny checkpoint, perturbed: the same stored tensors and bytes, and
    the same re-encoding error, as surgery.io.requantize."""
    path = build(tmp_path / "model")
    rng = np.random.default_rng(2)
    with Checkpoint(path) as ckpt:
        scheme = scheme_for(ckpt)
        names = sorted({n.removesuffix("_blocks").removesuffix("_scale_inv").removesuffix("_scale")
                        for n in ckpt.names() if ".experts." in n and (n.endswith("_blocks") or
                                                                        ckpt.info(n).dtype.startswith("F8_"))})
        assert names
        for name in names:
            value = dequantize(ckpt, name) * np.float32(1.01) + rng.standard_normal(1).astype(np.float32) * 1e-4
            want, want_error = requantize(ckpt, name, value, scheme)
            got, error = quant_encode.requantize_on_device(ckpt, name, _on(value, device), scheme)
            fields = [[(e.name, e.dtype, e.shape, e.data) for e in encoded] for encoded in (got, want)]
            assert fields[0] == fields[1]
            assert error == pytest.approx(want_error, rel=1e-6, abs=1e-9)
