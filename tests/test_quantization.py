"""The dequantization layer (surgery.io.quantization) on every published scheme, checked bit for bit
against transformers' own dequantization where it has one and an independent formula otherwise; the
weight criteria on quantized checkpoints against their dequantized copies; `prune` keeping the format;
bad quantized inputs turned into one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import Result
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from quantized_models import (BUILDERS, _load, _save, dequantized_copy, quantize_fp8_block, quantize_fp8_channel,
                              quantize_mxfp4, quantize_nvfp4, reference_dequantized, reference_nvfp4)
from tiny_models import checkpoint_bytes

from surgery.architectures import resolve
from surgery.errors import CheckpointError
from surgery.io import Checkpoint
from surgery.io.expert_weights import read_expert
from surgery.io.quant_formats import E2M1_TABLE, decode_fp8, fp8_block, mxfp4, nvfp4
from surgery.io.quantization import companions, dequantize, scheme_of

# The published dtypes each scheme's expert tensors must carry.
EXPERT_DTYPES = {
    "deepseek_fp8": {"F8_E4M3", "F32"}, "qwen3_fp8": {"F8_E4M3", "BF16"}, "qwen3_fp8_fused": {"F8_E4M3", "F32"},
    "glm_ct_fp8": {"F8_E4M3", "F32"},
    "glm_ct_fp8_tensor": {"F8_E4M3", "F32"}, "gpt_oss_mxfp4": {"U8", "BF16"}, "qwen3_nvfp4": {"U8", "F8_E4M3", "F32"},
}
SCHEMES = list(BUILDERS)


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("quantized")
    cache: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in cache:
            cache[scheme] = BUILDERS[scheme](root / scheme)
        return cache[scheme]

    return get


@pytest.fixture(scope="module")
def dequantized(quantized: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("dequantized")
    cache: dict[str, Path] = {}

    def get(scheme: str) -> Path:
        if scheme not in cache:
            cache[scheme] = dequantized_copy(quantized(scheme), root / scheme)
        return cache[scheme]

    return get


# ---------------------------------------------------------------------------------------------
# Element formats and formulas


@pytest.mark.parametrize("dtype,torch_dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2),
                                               ("F8_E8M0", torch.float8_e8m0fnu)])
def test_fp8_tables_equal_torch_for_every_code(dtype: str, torch_dtype: torch.dtype) -> None:
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes).view(torch_dtype).float()
    assert np.array_equal(bits(decode_fp8(codes, dtype)), bits(want))  # NaN payloads included


def test_e2m1_table_equals_transformers() -> None:
    assert np.array_equal(bits(E2M1_TABLE), bits(np.array(FP4_VALUES, np.float32)))


@pytest.mark.parametrize("shape,block", [((40, 56), (16, 24)), ((64, 32), (16, 16)), ((3, 40, 50), (8, 16))])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_formula_equals_transformers(shape, block, scale_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0  # no NaN codes
    w8 = w.view(torch.float8_e4m3fn)
    s_shape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = (torch.rand(s_shape, generator=gen) * 0.01 + 1e-4).to(scale_dtype)
    got = fp8_block(decode_fp8(w.numpy(), "F8_E4M3"), scale.float().numpy(), block)
    assert np.array_equal(bits(got), bits(_dequantize_fp8_weight(w8, scale, list(block), torch.float32)))
    if all(n % b == 0 for n, b in zip(shape[-2:], block)):  # the loader's op needs whole blocks
        loader = Fp8Dequantize(None)._dequantize_one(w8, scale, output_dtype=torch.float32)
        assert np.array_equal(bits(got), bits(loader))


def test_mxfp4_formula_equals_transformers_on_many_blocks() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 8, 4), generator=gen, dtype=torch.uint8)
    scales[0, 0, 0], scales[0, 0, 1] = 0, 254  # subnormal 2^-127 and 2^127
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert np.array_equal(bits(mxfp4(blocks.numpy(), scales.numpy())), bits(want))


def test_nvfp4_formula_equals_compressed_tensors_reading() -> None:
    gen = torch.Generator().manual_seed(2)
    packed = torch.randint(0, 256, (24, 32), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(24, 4, generator=gen) * 400).to(torch.float8_e4m3fn)
    gs = torch.tensor([1234.5])
    got = nvfp4(packed.numpy(), decode_fp8(scale.view(torch.uint8).numpy(), "F8_E4M3"), gs.numpy())
    assert np.array_equal(bits(got), bits(reference_nvfp4(packed, scale, gs)))


@pytest.mark.parametrize("name,quantize,bound", [
    ("fp8 block", lambda w: _dequantize_fp8_weight(*quantize_fp8_block(w, (16, 24), torch.float32), [16, 24],
                                                    torch.float32), 0.04),
    ("fp8 channel", lambda w: (lambda q, s: q.float() * s)(*quantize_fp8_channel(w, "channel")), 0.04),
    ("mxfp4", lambda w: convert_moe_packed_tensors(*quantize_mxfp4(w.unsqueeze(0)), dtype=torch.float32)[0].T, 0.2),
    ("nvfp4", lambda w: reference_nvfp4(*quantize_nvfp4(w)), 0.15),
])
def test_test_quantizers_round_trip_within_the_schemes_precision(name, quantize, bound) -> None:
    """The checkpoints below are real quantizations: their reference dequantization is close to the source."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    err = (quantize(w) - w).norm() / w.norm()
    assert 0 < err < bound, f"{name}: relative error {err}"


# ---------------------------------------------------------------------------------------------
# Whole checkpoints


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoints_use_the_published_naming(scheme: str, quantized: Callable[[str], Path]) -> None:
    tensors = checkpoint_bytes(quantized(scheme))
    experts = {n: dtype for n, (dtype, _, _) in tensors.items() if ".experts." in n}
    assert set(experts.values()) == EXPERT_DTYPES[scheme]
    suffixes = {re.sub(r".*\.experts\.(\d+\.)?", "", n) for n in experts}
    want = {
        "deepseek_fp8": {f"{p}.weight{s}" for p in ("gate_proj", "up_proj", "down_proj") for s in ("", "_scale_inv")},
        "gpt_oss_mxfp4": {f"{p}_{k}" for p in ("gate_up_proj", "down_proj") for k in ("blocks", "scales", "bias")},
        "qwen3_nvfp4": {f"{p}.{s}" for p in ("gate_proj", "up_proj", "down_proj")
                        for s in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")},
    }.get(scheme)
    if want:
        assert suffixes == want
    if scheme == "deepseek_fp8":
        assert "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv" in tensors  # MTP layer
        assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"
        assert tensors["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"][1] == [2, 2]  # ragged: 32 = 24 + 8


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_equals_reference_bit_for_bit(scheme: str, quantized: Callable[[str], Path]) -> None:
    path = quantized(scheme)
    reference = reference_dequantized(path)
    with Checkpoint(path) as ckpt:
        for name, want in reference.items():
            got = dequantize(ckpt, name)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                if scheme == "gpt_oss_mxfp4":  # rows-first storage order, transformers' is its transpose
                    want = want.transpose(1, 2)
                for e in (0, 5):
                    assert np.array_equal(bits(dequantize(ckpt, name, index=e)), bits(want[e])), (name, e)
            assert got.shape == tuple(want.shape), name
            assert np.array_equal(bits(got), bits(want)), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_read_expert_equals_dequantized_copy(scheme: str, quantized, dequantized) -> None:
    with Checkpoint(quantized(scheme)) as q, Checkpoint(dequantized(scheme)) as d:
        lq, ld = resolve(q.config, q.names()), resolve(d.config, d.names())
        assert list(lq.layers) == list(ld.layers)
        for layer in lq.layers:
            for e in range(lq.num_experts):
                mq, md = read_expert(q, lq, layer, e), read_expert(d, ld, layer, e)
                for role in ("gate", "up", "down"):
                    assert np.array_equal(bits(mq[role]), bits(md[role])), (layer, e, role)


@pytest.mark.parametrize("criterion", ["aimer", "weight_norm", "mcs-rwn", "mcs-wsr"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_criteria_equal_on_the_dequantized_copy(scheme: str, criterion: str, quantized, dequantized,
                                                       cli: Callable[..., Result], tmp_path: Path) -> None:
    docs = []
    for kind, path in (("q", quantized(scheme)), ("d", dequantized(scheme))):
        plan = tmp_path / f"{kind}.json"
        result = cli("score", "--model", path, "--criterion", criterion, "--ratio", "0.25", "-o", plan)
        assert result.exit_code == 0, result.output
        docs.append(json.loads(plan.read_text()))
    assert docs[0]["keep"] == docs[1]["keep"]
    assert docs[0]["scores"] == docs[1]["scores"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prune_by_aimer_keeps_dtypes_and_companions(scheme: str, quantized, cli: Callable[..., Result],
                                                    tmp_path: Path) -> None:
    src, out = quantized(scheme), tmp_path / "out"
    result = cli("prune", src, "--criterion", "aimer", "--ratio", "0.25", "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0
    before, after = checkpoint_bytes(src), checkpoint_bytes(out)
    generic = lambda n: re.sub(r"experts\.\d+\.", "experts.*.", n)  # noqa: E731
    assert {generic(n): d for n, (d, _, _) in before.items()} == {generic(n): d for n, (d, _, _) in after.items()}
    with Checkpoint(src) as s, Checkpoint(out) as o:
        ls, lo = resolve(s.config, s.names()), resolve(o.config, o.names())
        assert lo.num_experts == 6 and list(lo.layers) == list(ls.layers)
        assert o.config["quantization_config"] == s.config["quantization_config"]
        for layer in lo.layers:
            # every kept expert, dequantized, is one of the source's experts, in increasing order
            src_experts = [read_expert(s, ls, layer, e) for e in range(ls.num_experts)]
            ids = []
            for e in range(lo.num_experts):
                m = read_expert(o, lo, layer, e)
                ids.append(next(i for i, x in enumerate(src_experts)
                                if all(np.array_equal(bits(x[r]), bits(m[r])) for r in m)))
            assert ids == sorted(ids) and len(set(ids)) == 6
            # per-expert layouts: the kept expert's weights and every companion, byte for byte
            for new, names in lo.layers[layer].per_expert.items():
                old = ls.layers[layer].per_expert[ids[new]]
                strip = lambda n: n.split(".experts.", 1)[1].split(".", 1)[1]  # noqa: E731
                assert sorted(map(strip, names)) == sorted(map(strip, old))
                for n in names:
                    twin = next(x for x in old if strip(x) == strip(n))
                    assert after[n] == before[twin], n
                    assert {strip(c) for c in companions(n, o.weight_map)} == \
                        {strip(c) for c in companions(twin, s.weight_map)}


# ---------------------------------------------------------------------------------------------
# Bad input


def _edit(src: Path, dst: Path, tensors_edit=None, config_edit=None) -> Path:
    config, tensors = _load(src)
    if tensors_edit:
        tensors_edit(tensors)
    if config_edit:
        config_edit(config)
    return _save(dst, config, tensors)


SCALE = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
BAD = {
    # case: (scheme, tensor edit, config edit, words the one-line message must hold)
    "scale missing": ("deepseek_fp8", lambda t: t.pop(SCALE), None,
                      ["experts.3.up_proj.weight", SCALE, ".safetensors"]),
    "scale wrong shape": ("deepseek_fp8", lambda t: t.__setitem__(SCALE, torch.ones(2, 3)), None,
                          [SCALE, "[2, 3]", "[2, 2]", ".safetensors"]),
    "block size disagrees": ("deepseek_fp8", None,
                             lambda c: c["quantization_config"].__setitem__("weight_block_size", [32, 32]),
                             ["weight_scale_inv", "weight_block_size [32, 32]", "blocks of about [16, 16]",
                              "the config disagrees", ".safetensors"]),
    "unknown quant_method": ("qwen3_fp8", None, lambda c: c["quantization_config"].__setitem__("quant_method", "awq"),
                             ["'awq'", "config.json", "not supported"]),
    "unknown compressed-tensors format": (
        "glm_ct_fp8", None,
        lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
            format="pack-quantized", weights={"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}),
        ["compressed-tensors", "4-bit int group", "pack-quantized", "config.json"]),
    "channel scale wrong shape": ("glm_ct_fp8",
                                  lambda t: t.__setitem__("model.layers.1.mlp.experts.2.gate_proj.weight_scale",
                                                          torch.ones(31, 1)), None,
                                  ["experts.2.gate_proj.weight_scale", "[31, 1]", "[32, 1]"]),
    "nvfp4 global scale missing": ("qwen3_nvfp4",
                                   lambda t: t.pop("model.layers.0.mlp.experts.1.down_proj.weight_global_scale"), None,
                                   ["experts.1.down_proj.weight_global_scale", ".safetensors"]),
    "mxfp4 scales wrong shape": ("gpt_oss_mxfp4",
                                 lambda t: t.__setitem__("model.layers.1.mlp.experts.down_proj_scales",
                                                         t["model.layers.1.mlp.experts.down_proj_scales"][:, :16]),
                                 None, ["down_proj_scales", "[8, 16, 1]", "[8, 32, 1]"]),
    "fp8 weights without quantization_config": ("qwen3_fp8", None, lambda c: c.pop("quantization_config"),
                                                ["F8_E4M3", "no quantization_config"]),
}


@pytest.mark.parametrize("command", ["score", "prune"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_input_is_one_line_exit_2_nothing_written(case: str, command: str, quantized,
                                                               cli: Callable[..., Result], tmp_path: Path) -> None:
    scheme, tensors_edit, config_edit, words = BAD[case]
    bad = _edit(quantized(scheme), tmp_path / "bad", tensors_edit, config_edit)
    out = tmp_path / ("plan.json" if command == "score" else "out")
    args = (["score", "--model", bad] if command == "score" else ["prune", bad]) + \
        ["--criterion", "aimer", "--ratio", "0.25", "-o", out]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip() if result.stderr_bytes is not None else result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_scheme_of_reads_each_published_config(quantized: Callable[[str], Path]) -> None:
    got = {s: scheme_of(json.loads((quantized(s) / "config.json").read_text())) for s in SCHEMES}
    assert got["deepseek_fp8"].block == (16, 24) and got["deepseek_fp8"].fp8 == {"block"}
    assert got["glm_ct_fp8"].fp8 == {"channel"} and got["glm_ct_fp8_tensor"].fp8 == {"tensor"}
    assert got["qwen3_nvfp4"].fp4_group == 16 and got["gpt_oss_mxfp4"].method == "mxfp4"
    assert scheme_of({"model_type": "qwen3_moe"}) is None
    assert scheme_of({"quantization_config": {"quant_method": "fp8"}}).fp8 == {"tensor"}
    with pytest.raises(CheckpointError, match=r"weight_block_size must be two positive integers"):
        scheme_of({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}})


def test_companions_cover_every_scheme() -> None:
    names = {"a.weight", "a.weight_scale_inv", "b.weight_packed", "b.weight_scale", "b.weight_global_scale",
             "b.input_global_scale", "x.gate_up_proj_blocks", "x.gate_up_proj_scales", "x.gate_up_proj_bias"}
    assert companions("a.weight", names) == ["a.weight_scale_inv"]
    assert set(companions("b.weight", names)) == {"b.weight_packed", "b.weight_scale", "b.weight_global_scale",
                                                  "b.input_global_scale"}
    assert companions("x.gate_up_proj", names) == ["x.gate_up_proj_blocks", "x.gate_up_proj_scales"]
    assert companions("x.gate_up_proj_blocks", names) == ["x.gate_up_proj_scales"]
