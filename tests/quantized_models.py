"""Tiny quantized MoE checkpoints in the published naming, and their dequantized float32 copies.

Each is made from a random tiny model (tests/tiny_models.py) cast to bf16 and quantized with the
scheme's own rules, written with plain safetensors:

* `deepseek_fp8`: DeepSeek-V3 style, FP8 e4m3 with F32 `weight_scale_inv` per block (a block size that
  leaves ragged edge blocks), MTP layer, `gate.e_score_correction_bias` F32, router and lm_head unquantized.
* `qwen3_fp8`: Qwen3 -FP8 style, the same scheme with BF16 scales.
* `glm_ct_fp8`: GLM-4.5-FP8 style compressed-tensors `float-quantized` FP8 with F32 `weight_scale`
  per channel ([out, 1]) or, with `strategy="tensor"`, per tensor ([1]).
* `gpt_oss_mxfp4`: gpt-oss MXFP4, fused `*_blocks` [E, rows, cols/32, 16] / `*_scales` [E, rows, cols/32].
* `qwen3_nvfp4`: compressed-tensors `nvfp4-pack-quantized` (`weight_packed`, `weight_scale` e4m3 per
  16 values, `weight_global_scale`, `input_global_scale`).

`dequantized_copy` writes the float32 model a quantized one stands for, using reference dequantizers
that never touch surgery.io.quantization: transformers' own (`_dequantize_fp8_weight`,
`convert_moe_packed_tensors`) where it has one, else the formula written out here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
try:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
except ImportError:  # transformers before 5.2x (the GPU image): the same block-scale formula written out
    def _dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, block: list[int],
                               dtype: torch.dtype) -> torch.Tensor:
        rows, cols = weight.shape[-2:]
        full = scale.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]
        return (weight.float() * full).to(dtype)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import surgery.io.quant_formats as qf
from tiny_models import INDEX_NAME, add_fake_mtp_layer, build_tiny, write_checkpoint

FP8_MAX = 448.0
FP4_MAX = 6.0
ROUTER = re.compile(r"\.mlp\.(gate|router)\.weight$")


def _load(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    index = json.loads((path / INDEX_NAME).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(path / shard))
    return json.loads((path / "config.json").read_text()), tensors


def _save(path: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    names = sorted(tensors)
    step = -(-len(names) // shards)
    parts = [{n: tensors[n].contiguous() for n in names[i:i + step]} for i in range(0, len(names), step)]
    write_checkpoint(path, config, parts)
    (path / "tokenizer_config.json").write_text("{}\n")
    return path


def _quantizable(name: str, t: torch.Tensor) -> bool:
    """Linear weights are quantized; embeddings, lm_head, routers, norms and biases stay as they are."""
    return (t.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name
            and not name.startswith("lm_head") and not ROUTER.search(name))


def _bf16_source(model_type: str, path: Path, layout: str, seed: int, mtp: bool = False) -> tuple[dict, dict]:
    """A tiny random model, with every tensor cast to bf16 but selection-only biases (kept F32 as published)."""
    src = build_tiny(model_type, path.parent / f"{path.name}-float", layout=layout, seed=seed)
    if mtp:
        add_fake_mtp_layer(src)
    config, tensors = _load(src)
    shutil.rmtree(src)
    out = {n: t if n.endswith("e_score_correction_bias") else t.to(torch.bfloat16) for n, t in tensors.items()}
    config["dtype"] = "bfloat16"
    return config, out


# ---------------------------------------------------------------------------------------------
# The schemes' quantizers


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 rule (surgery.io.quant_formats.quantize_fp8): per (bm × bn) block (edge blocks ragged)
    s = amax / 448 stored as `weight_scale_inv`, w / s rounded to e4m3."""
    codes, scale, _ = qf.quantize_fp8(w.float().numpy(), "block", block, "F8_E4M3", _SCALE_DTYPES[scale_dtype])
    return _fp8(codes), torch.from_numpy(scale).to(scale_dtype)


def quantize_fp8_channel(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors float-quantized FP8: scale = amax / 448 per output row ([out, 1]) or tensor ([1])."""
    codes, scale, _ = qf.quantize_fp8(w.float().numpy(), strategy, None)
    return _fp8(codes), torch.from_numpy(scale if strategy == "channel" else scale.reshape(1))


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX (surgery.io.quant_formats.quantize_mxfp4): blocks [..., G, 16] and e8m0 scales [..., G]."""
    blocks, scales = qf.quantize_mxfp4(w.float().numpy())
    return torch.from_numpy(blocks), torch.from_numpy(scales)


def quantize_nvfp4(w: torch.Tensor, group: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 as llm-compressor writes it (surgery.io.quant_formats.quantize_nvfp4): packed codes, e4m3
    scales per `group` values and the global divisor [1]."""
    packed, scale, global_scale = qf.quantize_nvfp4(w.float().numpy(), group)
    return torch.from_numpy(packed), _fp8(scale), torch.from_numpy(global_scale.reshape(1))


def _fp8(codes) -> torch.Tensor:
    return torch.from_numpy(codes).view(torch.float8_e4m3fn)


_SCALE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ---------------------------------------------------------------------------------------------
# The checkpoints


def _fp8_block_model(model_type: str, path: Path, block: tuple[int, int], scale_dtype: torch.dtype, mtp: bool,
                     seed: int, layout: str = "per-expert") -> Path:
    config, tensors = _bf16_source(model_type, path, layout, seed, mtp=mtp)
    out = {}
    for name, t in tensors.items():
        if _quantizable(name, t):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(t, block, scale_dtype)
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # transformers 5 fused, per expert
            pairs = [quantize_fp8_block(m, block, scale_dtype) for m in t]
            out[name] = torch.stack([q for q, _ in pairs])
            out[name + "_scale_inv"] = torch.stack([sc for _, sc in pairs])
        else:
            out[name] = t
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }
    return _save(path, config, out)


def deepseek_fp8(path: Path, block: tuple[int, int] = (16, 24), seed: int = 3) -> Path:
    """deepseek_v3: MoE layers 1, 2 and MTP layer 3; F32 scales; 32 % 24 leaves ragged edge blocks."""
    return _fp8_block_model("deepseek_v3", path, block, torch.float32, mtp=True, seed=seed)


def qwen3_fp8(path: Path, block: tuple[int, int] = (16, 16), seed: int = 4) -> Path:
    """qwen3_moe with BF16 `weight_scale_inv`, like the Qwen3 -FP8 releases."""
    return _fp8_block_model("qwen3_moe", path, block, torch.bfloat16, mtp=False, seed=seed)


def qwen3_fp8_fused(path: Path, block: tuple[int, int] = (16, 24), seed: int = 8) -> Path:
    """qwen3_moe saved fused by transformers 5 ([E, 2I, H] / [E, H, I]) in FP8: `experts.gate_up_proj` with
    `experts.gate_up_proj_scale_inv` [E, ⌈2I/bm⌉, ⌈H/bn⌉], transformers' own naming for fused FP8 experts."""
    return _fp8_block_model("qwen3_moe", path, block, torch.float32, mtp=False, seed=seed, layout="fused")


def glm_ct_fp8(path: Path, strategy: str = "channel", seed: int = 5) -> Path:
    """glm4_moe as compressed-tensors float-quantized FP8 (dynamic per-token activations)."""
    config, tensors = _bf16_source("glm4_moe", path, "per-expert", seed)
    out = {}
    for name, t in tensors.items():
        if _quantizable(name, t):
            out[name], out[name.removesuffix("weight") + "weight_scale"] = quantize_fp8_channel(t, strategy)
        else:
            out[name] = t
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
        }},
        "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None, "sparsity_config": {},
    }
    return _save(path, config, out)


def gpt_oss_mxfp4(path: Path, seed: int = 6) -> Path:
    """gpt_oss with MXFP4 experts: the bf16 [E, H, 2I] / [E, I, H] become rows-first blocks and scales."""
    config, tensors = _bf16_source("gpt_oss", path, "fused", seed)
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    return _save(path, config, out)


def qwen3_nvfp4(path: Path, seed: int = 7) -> Path:
    """qwen3_moe as compressed-tensors nvfp4-pack-quantized (W4A4 recipe: input_global_scale kept)."""
    config, tensors = _bf16_source("qwen3_moe", path, "per-expert", seed)
    out = {}
    for name, t in tensors.items():
        if _quantizable(name, t):
            m = name.removesuffix(".weight")
            out[f"{m}.weight_packed"], out[f"{m}.weight_scale"], out[f"{m}.weight_global_scale"] = quantize_nvfp4(t)
            out[f"{m}.input_global_scale"] = torch.tensor([FP8_MAX * FP4_MAX / 3.0])
        else:
            out[name] = t
    fp4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
           "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized", "weights": fp4,
                                      "input_activations": {**fp4, "dynamic": "local"}}},
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    return _save(path, config, out)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "deepseek_fp8": deepseek_fp8, "qwen3_fp8": qwen3_fp8, "qwen3_fp8_fused": qwen3_fp8_fused, "glm_ct_fp8": glm_ct_fp8,
    "glm_ct_fp8_tensor": lambda p: glm_ct_fp8(p, "tensor"), "gpt_oss_mxfp4": gpt_oss_mxfp4,
    "qwen3_nvfp4": qwen3_nvfp4,
}

# ---------------------------------------------------------------------------------------------
# Reference dequantization (independent of surgery.io.quantization)


def reference_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' reading: low nibble = even column; value = e2m1 · (e4m3 scale / global)."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    rows = packed.shape[0]
    vals = torch.stack([lut[(packed & 0x0F).long()], lut[(packed >> 4).long()]], dim=-1).reshape(rows, -1)
    eff = scale.float() / global_scale.float()
    group = vals.shape[1] // eff.shape[1]
    return (vals.reshape(rows, -1, group) * eff.unsqueeze(-1)).reshape(rows, -1)


def reference_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """name -> float32 tensor of every weight of a quantized checkpoint, under its unquantized name and
    in the unquantized on-disk layout; companions dropped."""
    config, tensors = _load(path)
    qc = config["quantization_config"]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(("_scale_inv", ".weight_scale", ".weight_global_scale", ".input_global_scale", "_scales")):
            continue
        if qc["quant_method"] == "fp8" and t.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"]
            out[name] = _dequantize_fp8_weight(t, scale, qc["weight_block_size"], torch.float32)
        elif qc["quant_method"] == "compressed-tensors" and t.dtype == torch.float8_e4m3fn:
            scale = tensors[name.removesuffix("weight") + "weight_scale"].float()
            out[name] = t.float() * (scale if scale.ndim == 2 else scale.reshape(()))
        elif name.endswith(".weight_packed"):
            m = name.removesuffix(".weight_packed")
            out[f"{m}.weight"] = reference_nvfp4(t, tensors[f"{m}.weight_scale"], tensors[f"{m}.weight_global_scale"])
        elif name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            # transformers returns [E, cols, rows]: the bf16 layout, gate_up [E, H, 2I] and down [E, I, H]
            out[base] = convert_moe_packed_tensors(t, tensors[base + "_scales"], dtype=torch.float32)
        else:
            out[name] = t.float()
    return out


def dequantized_copy(path: Path, out: Path) -> Path:
    """The float32 checkpoint that `path` (quantized) stands for, without quantization_config."""
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    return _save(out, config, reference_dequantized(path))
