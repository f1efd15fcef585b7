"""Byte-exactness of the rewrite on checkpoints written directly with safetensors (no transformers):
bf16, FP8 E4M3 with F32 `weight_scale_inv` companions, and gpt_oss MXFP4 `_blocks`/`_scales`."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Callable

import torch
from click.testing import Result

from tiny_models import INDEX_NAME, checkpoint_bytes, take_bytes, write_checkpoint

H, I, V = 256, 128, 64  # FP8 block 128: gate/up scales [1, 2], down scales [2, 1]
E = 8


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.randn(shape, generator=gen).to(dtype)


def _linear(name: str, out: int, inp: int, fp8: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A projection: bf16, or F8_E4M3 with its F32 128×128-block `weight_scale_inv`."""
    if not fp8:
        return {f"{name}.weight": _rand((out, inp), torch.bfloat16, gen)}
    return {
        f"{name}.weight": _rand((out, inp), torch.float8_e4m3fn, gen),
        f"{name}.weight_scale_inv": _rand((-(-out // 128), -(-inp // 128)), torch.float32, gen),
    }


def _split(tensors: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(tensors)
    step = -(-len(names) // shards)
    return [{n: tensors[n] for n in names[i:i + step]} for i in range(0, len(names), step)]


def qwen_like_checkpoint(path: Path, model_type: str, shards: int = 3) -> Path:
    """qwen3_moe (bf16 experts, layer 0 dense) or deepseek_v3 (FP8, groups, shared experts, MTP layer 2)."""
    gen = torch.Generator().manual_seed(0)
    fp8 = model_type == "deepseek_v3"
    if fp8:
        config = {
            "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 2,
            "hidden_size": H, "moe_intermediate_size": I, "n_routed_experts": E, "num_experts_per_tok": 2,
            "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
            "num_nextn_predict_layers": 1,
            "quantization_config": {
                "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.experts.5.down_proj",
                                           "model.layers.1.mlp.experts.1.down_proj"],
            },
        }
        layers = {0: "dense", 1: "moe", 2: "moe"}  # layer 2 = MTP
    else:
        config = {
            "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
            "hidden_size": H, "moe_intermediate_size": I, "num_experts": E, "num_experts_per_tok": 2,
            "mlp_only_layers": [0], "dtype": "bfloat16",
        }
        layers = {0: "dense", 1: "moe"}
    tensors = {
        "model.embed_tokens.weight": _rand((V, H), torch.bfloat16, gen),
        "model.norm.weight": _rand((H,), torch.bfloat16, gen),
        "lm_head.weight": _rand((V, H), torch.bfloat16, gen),
    }
    for layer, kind in layers.items():
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = _rand((H,), torch.bfloat16, gen)
        tensors.update(_linear(f"{p}.self_attn.o_proj", H, H, fp8, gen))
        if kind == "dense":
            for proj, (o, i) in {"gate_proj": (2 * I, H), "up_proj": (2 * I, H), "down_proj": (H, 2 * I)}.items():
                tensors.update(_linear(f"{p}.mlp.{proj}", o, i, fp8, gen))
            continue
        tensors[f"{p}.mlp.gate.weight"] = _rand((E, H), torch.bfloat16, gen)
        if fp8:
            tensors[f"{p}.mlp.gate.e_score_correction_bias"] = _rand((E,), torch.float32, gen)
            for proj, (o, i) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                tensors.update(_linear(f"{p}.mlp.shared_experts.{proj}", o, i, fp8, gen))
        for e in range(E):
            for proj, (o, i) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                tensors.update(_linear(f"{p}.mlp.experts.{e}.{proj}", o, i, fp8, gen))
    return write_checkpoint(path, config, _split(tensors, shards))


def gpt_oss_mxfp4_checkpoint(path: Path) -> Path:
    """gpt_oss with MXFP4 experts (U8 blocks/scales, expert axis 0), shards named from 00000 like the Hub."""
    gen = torch.Generator().manual_seed(1)
    h, i = 64, 64
    config = {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 2, "hidden_size": h,
        "intermediate_size": i, "num_local_experts": E, "num_experts_per_tok": 2, "experts_per_token": 2,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                   "model.layers.*.mlp.router"]},
    }
    tensors = {"model.embed_tokens.weight": _rand((V, h), torch.bfloat16, gen)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        tensors[f"{p}.self_attn.sinks"] = _rand((4,), torch.bfloat16, gen)
        tensors[f"{p}.mlp.router.weight"] = _rand((E, h), torch.bfloat16, gen)
        tensors[f"{p}.mlp.router.bias"] = _rand((E,), torch.bfloat16, gen)
        x = f"{p}.mlp.experts"
        tensors[f"{x}.gate_up_proj_blocks"] = _rand((E, 2 * i, h // 32, 16), torch.uint8, gen)
        tensors[f"{x}.gate_up_proj_scales"] = _rand((E, 2 * i, h // 32), torch.uint8, gen)
        tensors[f"{x}.gate_up_proj_bias"] = _rand((E, 2 * i), torch.bfloat16, gen)
        tensors[f"{x}.down_proj_blocks"] = _rand((E, h, i // 32, 16), torch.uint8, gen)
        tensors[f"{x}.down_proj_scales"] = _rand((E, h, i // 32), torch.uint8, gen)
        tensors[f"{x}.down_proj_bias"] = _rand((E, h), torch.bfloat16, gen)
    path = write_checkpoint(path, config, _split(tensors, 3))
    index = json.loads((path / INDEX_NAME).read_text())
    old = sorted(set(index["weight_map"].values()))
    renames = {s: f"model-{k:05d}-of-00002.safetensors" for k, s in enumerate(old)}
    for old, new in renames.items():
        (path / old).rename(path / new)
    index["weight_map"] = {n: renames[s] for n, s in index["weight_map"].items()}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return path


def expected_output(
    src: Path, keep: dict[str, list[int]], sliced: dict[str, int]
) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, sha256) the pruned checkpoint must hold, derived from the source bytes.

    `keep` maps a MoE block prefix to its kept ids; under it, `experts.<i>.*` is renumbered,
    names in `sliced` (suffix -> expert axis) are cut along that axis, the rest is copied.
    """
    want = {}
    for name, (dtype, shape, raw) in checkpoint_bytes(src).items():
        prefix = next((p for p in keep if name.startswith(p + ".")), None)
        rest = name[len(prefix) + 1:] if prefix else ""
        if prefix and (m := re.match(r"experts\.(\d+)\.(.+)$", rest)):
            if int(m[1]) in keep[prefix]:
                want[f"{prefix}.experts.{keep[prefix].index(int(m[1]))}.{m[2]}"] = (dtype, shape, _sha(raw))
        elif prefix and rest in sliced:
            axis = sliced[rest]
            new_shape = [*shape[:axis], len(keep[prefix]), *shape[axis + 1:]]
            want[name] = (dtype, new_shape, _sha(take_bytes(raw, shape, keep[prefix], axis)))
        else:
            want[name] = (dtype, shape, _sha(raw))
    return want


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def actual_output(out: Path) -> dict[str, tuple[str, list[int], str]]:
    return {name: (dtype, shape, _sha(raw)) for name, (dtype, shape, raw) in checkpoint_bytes(out).items()}


def prune(cli: Callable[..., Result], src: Path, keep: dict[int, list[int]], out: Path) -> None:
    plan = src.parent / f"{src.name}.plan.json"
    plan.write_text(json.dumps({"keep": {str(k): v for k, v in keep.items()}}))
    result = cli("prune", src, "--plan", plan, "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0


def test_qwen3_moe_bf16_per_expert(tmp_path: Path, cli: Callable[..., Result]) -> None:
    src = qwen_like_checkpoint(tmp_path / "src", "qwen3_moe")
    keep = [0, 2, 3, 6, 7]
    prune(cli, src, {1: keep}, tmp_path / "out")
    assert actual_output(tmp_path / "out") == expected_output(src, {"model.layers.1.mlp": keep}, {"gate.weight": 0})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == len(keep) and "num_local_experts" not in config


def test_deepseek_v3_fp8_with_scales_and_mtp(tmp_path: Path, cli: Callable[..., Result]) -> None:
    src = qwen_like_checkpoint(tmp_path / "src", "deepseek_v3")
    keep = [0, 2, 3, 4, 5, 7]  # 3 of each group of 4
    prune(cli, src, {1: keep}, tmp_path / "out")
    sliced = {"gate.weight": 0, "gate.e_score_correction_bias": 0}
    blocks = {"model.layers.1.mlp": keep, "model.layers.2.mlp": keep}  # MTP layer 2 follows layer 1
    want = expected_output(src, blocks, sliced)
    assert actual_output(tmp_path / "out") == want
    assert {dtype for name, (dtype, _, _) in want.items() if ".experts." in name} == {"F8_E4M3", "F32"}
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quant["modules_to_not_convert"] == ["lm_head", "model.layers.1.mlp.experts.4.down_proj"]


def test_gpt_oss_mxfp4_fused(tmp_path: Path, cli: Callable[..., Result]) -> None:
    src = gpt_oss_mxfp4_checkpoint(tmp_path / "src")
    keep = {0: [1, 2, 4, 5, 7], 1: [0, 3, 4, 5, 6]}
    prune(cli, src, keep, tmp_path / "out")
    sliced = {"router.weight": 0, "router.bias": 0} | {
        f"experts.{p}_{kind}": 0 for p in ("gate_up_proj", "down_proj") for kind in ("blocks", "scales", "bias")
    }
    want = expected_output(src, {f"model.layers.{k}.mlp": v for k, v in keep.items()}, sliced)
    assert actual_output(tmp_path / "out") == want
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 5 and config["experts_per_token"] == 2


def test_single_file_checkpoint_stays_single_file(tmp_path: Path, cli: Callable[..., Result]) -> None:
    src = qwen_like_checkpoint(tmp_path / "src", "qwen3_moe", shards=1)
    keep = [1, 2, 3, 4, 5, 6]
    prune(cli, src, {1: keep}, tmp_path / "out")
    assert sorted(f.name for f in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert actual_output(tmp_path / "out") == expected_output(src, {"model.layers.1.mlp": keep}, {"gate.weight": 0})


def test_provenance_hashes(tmp_path: Path, cli: Callable[..., Result]) -> None:
    """Header hashes always; content hashes with --hash-shards, and for free from Hugging Face cache blob names."""
    src = qwen_like_checkpoint(tmp_path / "src", "qwen3_moe")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    content = {s: hashlib.sha256((src / s).read_bytes()).hexdigest() for s in shards}
    keep = {1: [0, 2, 3, 6, 7]}

    prune(cli, src, keep, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "pruning.json").read_text())["source"]
    assert plain["shards_sha256"] is None
    for s in shards:
        raw = (src / s).read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        assert plain["shards_header_sha256"][s] == hashlib.sha256(raw[: 8 + hlen]).hexdigest()

    plan = src.parent / f"{src.name}.plan.json"  # written by prune() above
    result = cli("prune", str(src), "--plan", str(plan), "-o", str(tmp_path / "hashed"), "--hash-shards")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hashed" / "pruning.json").read_text())["source"]["shards_sha256"] == content

    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshot").mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            blob = cache / "blobs" / content[f.name]
            blob.write_bytes(f.read_bytes())
            (cache / "snapshot" / f.name).symlink_to(blob)
        else:
            (cache / "snapshot" / f.name).write_bytes(f.read_bytes())
    prune(cli, cache / "snapshot", keep, tmp_path / "from-cache")
    assert json.loads((tmp_path / "from-cache" / "pruning.json").read_text())["source"]["shards_sha256"] == content
