"""Decoding quantized weights with torch from their raw bytes (surgery.model.dequant, what the reader does
on the device) is bit-identical to the host numpy dequantization (surgery.io.quantization.dequantize):
every element code, every weight of every scheme in tests/quantized_models.py whole and per expert slab,
and every quantized piece of a loaded model after its transforms and the cast to bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quantized_models import BUILDERS, _load, _save
from surgery.architectures import resolve
from surgery.io import Checkpoint
from surgery.io.quant_formats import FP8_TABLES, quantize_nvfp4, unpack_e2m1
from surgery.io.quantization import SCALE_SUFFIXES, dequantize, encoded, is_quantized
from surgery.model.dequant import _floats, decode
from surgery.model.dequant import unpack_e2m1 as device_unpack_e2m1
from surgery.model.load import fill_model
from surgery.model.reader import _pread_into
from surgery.model.weights import apply_transform, plain_config, plan_module


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU host: the CUDA kernels too


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device-dequant")
    return {scheme: build(root / scheme) for scheme, build in BUILDERS.items()}


@pytest.mark.parametrize("dtype", sorted(FP8_TABLES))
def test_every_fp8_code_equals_the_table(dtype: str) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(_bits(_floats(codes, dtype, (256,))), FP8_TABLES[dtype].view(np.int32))


def test_every_e2m1_byte_equals_the_table() -> None:
    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert np.array_equal(_bits(device_unpack_e2m1(packed)), unpack_e2m1(packed.numpy()).view(np.int32))


def _raw(enc, device: str = "cpu") -> dict[str, torch.Tensor]:
    out = {}
    for role, span in enc.parts.items():
        out[role] = torch.empty(span.nbytes, dtype=torch.uint8)
        _pread_into(span.file, span.begin, out[role].numpy())
    return {role: t.to(device) for role, t in out.items()}


def _same(got: torch.Tensor, want: np.ndarray, device: str) -> bool:
    """Bit for bit; on CUDA NaNs only as NaNs (a CUDA product of a NaN drops its payload bits)."""
    a, b = _bits(got), want.view(np.int32)
    if device == "cpu":
        return np.array_equal(a, b)
    nan = np.isnan(want)
    return np.array_equal(np.isnan(got.cpu().numpy()), nan) and np.array_equal(a[~nan], b[~nan])


def _weights(ckpt: Checkpoint) -> list[str]:
    """Every quantized weight, named as `dequantize` takes it."""
    return sorted({n.removesuffix("_blocks").removesuffix("_packed") for n in ckpt.weight_map
                   if is_quantized(ckpt, n) and not n.endswith(SCALE_SUFFIXES)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", sorted(BUILDERS))
def test_decode_equals_dequantize(scheme: str, device: str, checkpoints) -> None:
    with Checkpoint(checkpoints[scheme]) as ckpt:
        names = _weights(ckpt)
        assert names
        slabs = 0
        for name in names:
            whole = dequantize(ckpt, name)
            indices = [None] + (list(range(whole.shape[0])) if whole.ndim > 2 else [])
            slabs += len(indices) - 1
            for index in indices:
                enc = encoded(ckpt, name, index)
                got = decode(enc, _raw(enc, device))
                want = whole if index is None else dequantize(ckpt, name, index)
                assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, (name, index)
                assert _same(got, want, device), (name, index)
        if scheme in ("qwen3_fp8_fused", "gpt_oss_mxfp4"):
            assert slabs  # fused experts are checked one slab at a time too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", sorted(BUILDERS))
def test_loaded_pieces_equal_host_dequantization(scheme: str, device: str, checkpoints) -> None:
    """Through the planner and the reader: transforms (transpose, deinterleave) and the bf16 cast."""
    path = checkpoints[scheme]
    config = plain_config(AutoConfig.from_pretrained(path))
    with Checkpoint(path) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        fill_model(model, config, ckpt, layout, torch.device(device))
        pieces = [p for p in plan_module(model, "", ckpt, layout, None) if p.quantized is not None]
        assert pieces
        for p in pieces:
            host = torch.from_numpy(np.ascontiguousarray(dequantize(ckpt, p.quantized, p.index)))
            want = apply_transform(host, p.transform).to(torch.bfloat16)
            assert np.array_equal(_bits(p.target), _bits(want)), (p.quantized, p.index, p.transform)
        assert any(p.transform for p in pieces) or scheme not in ("gpt_oss_mxfp4",)


def _with_extra(src: Path, out: Path, extra: dict[str, torch.Tensor]) -> Path:
    config, tensors = _load(src)
    return _save(out, config, {**tensors, **extra})


@pytest.mark.parametrize("device", DEVICES)
def test_rare_layouts_equal_dequantize(device: str, checkpoints, tmp_path: Path) -> None:
    """Layouts the tiny models do not have: fused NVFP4 (one global scale per expert), FP8 e5m2 codes with
    e8m0 block scales and every code (NaN and inf included), BF16 block scales."""
    gen = torch.Generator().manual_seed(1)
    packed, scale, global_scale = quantize_nvfp4(torch.randn(3, 8, 32, generator=gen).numpy())
    nvfp4 = _with_extra(checkpoints["qwen3_nvfp4"], tmp_path / "nvfp4", {
        "model.extra.weight_packed": torch.from_numpy(packed), "model.extra.weight_global_scale":
        torch.from_numpy(global_scale), "model.extra.weight_scale": torch.from_numpy(scale).view(torch.float8_e4m3fn)})
    codes = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=gen)  # deepseek_fp8 blocks: 16 x 24
    fp8 = _with_extra(checkpoints["deepseek_fp8"], tmp_path / "fp8", {
        "model.e5m2.weight": codes.view(torch.float8_e5m2),
        "model.e5m2.weight_scale_inv": torch.randint(110, 140, (3, 3, 3), dtype=torch.uint8,
                                                     generator=gen).view(torch.float8_e8m0fnu),
        "model.bf16.weight": codes[0].clone().view(torch.float8_e4m3fn),
        "model.bf16.weight_scale_inv": torch.rand(3, 3, generator=gen).to(torch.bfloat16)})
    for path, names in ((nvfp4, ["model.extra.weight"]), (fp8, ["model.e5m2.weight", "model.bf16.weight"])):
        with Checkpoint(path) as ckpt:
            for name in names:
                whole = dequantize(ckpt, name)
                for index in [None] + list(range(whole.shape[0]) if whole.ndim > 2 else []):
                    enc = encoded(ckpt, name, index)
                    want = whole if index is None else dequantize(ckpt, name, index)
                    assert _same(decode(enc, _raw(enc, device)), want, device), (name, index)
