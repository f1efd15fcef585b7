"""Tiny randomly initialised MoE checkpoints for every supported architecture, and an
independent reference for pruning: the original model with dropped experts masked in its routers.

Nothing here imports the rewriter; only the registry's plain data (router attribute, mask value)
is read, so a wrong rewrite cannot make its own reference agree with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from surgery.architectures import get_spec

ARCHS: list[str] = [
    "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "ernie4_5_moe", "gpt_oss", "granitemoe", "llama4_text",
]

# Architectures whose Hub checkpoints are fused already: they only have one on-disk layout.
NATIVE_FUSED = {"gpt_oss", "granitemoe", "llama4_text"}
LAYOUTS: dict[str, tuple[str, ...]] = {
    mt: ("fused",) if mt in NATIVE_FUSED else ("per-expert", "fused") for mt in ARCHS
}

NUM_EXPERTS = 8
INDEX_NAME = "model.safetensors.index.json"

_COMMON = dict(
    vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_DEEPSEEK_ATTN = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
)

# Per model_type: config overrides on top of _COMMON. Dense layers where the architecture has them.
_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "phimoe": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=NUM_EXPERTS, num_experts_per_tok=2, mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, num_experts=NUM_EXPERTS,
        num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, mlp_only_layers=[1],
    ),
    "qwen3_next": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=NUM_EXPERTS, num_experts_per_tok=2, head_dim=8, mlp_only_layers=[0],
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=32, num_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=8,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5, **_DEEPSEEK_ATTN,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, **_DEEPSEEK_ATTN,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=8,
    ),
    "ernie4_5_moe": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, moe_num_experts=NUM_EXPERTS, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2,
    ),
    "gpt_oss": dict(
        num_hidden_layers=2, intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2, head_dim=8,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
    "granitemoe": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "llama4_text": dict(
        num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=64, num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=2, attention_chunk_size=64,
    ),
}

ROUTER_SCALE = 1.5  # router weight std × sqrt(hidden): logits of std ~1.5 pick varied experts
EXPERT_STD = 0.2  # large enough that removing an expert moves the logits measurably
BIAS_STD = 0.5  # router bias (gpt_oss), in logit units
CORRECTION_STD = 0.3  # selection-only bias on probabilities in (0, 1): large enough to matter


def tiny_config(model_type: str) -> PreTrainedConfig:
    """A float32 config with 8 routed experts, top-2 (llama4: top-1), 2-4 layers, vocab 128."""
    return AutoConfig.for_model(model_type, dtype="float32", **{**_COMMON, **_CONFIGS[model_type]})


def moe_blocks(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its MoE block (the module with an `experts` child)."""
    blocks = {}
    for i, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "experts", None), torch.nn.Module):
                blocks[i] = module
                break
    return blocks


def moe_layers(model_dir: str | Path) -> list[int]:
    """MoE layer indices of a saved model (built on the meta device from its config)."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sorted(moe_blocks(model))


def _randomise(model: PreTrainedModel, gen: torch.Generator) -> None:
    """Give routers (weights, biases, correction biases) and experts non-degenerate random values."""
    spec = get_spec(model.config.model_type)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for block in moe_blocks(model).values():
            router = getattr(block, spec.router_module)
            for name, t in [*router.named_parameters(), *router.named_buffers()]:
                if name.endswith("e_score_correction_bias"):
                    std = CORRECTION_STD
                elif name.endswith("bias"):
                    std = BIAS_STD
                else:
                    std = ROUTER_SCALE / math.sqrt(hidden)
                t.copy_(torch.randn(t.shape, generator=gen) * std)
            for t in block.experts.parameters():
                t.copy_(torch.randn(t.shape, generator=gen) * EXPERT_STD)


def _shard_size(model: PreTrainedModel, shards: int) -> int:
    """A max_shard_size that splits the model's bytes into more than `shards` files."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(1, total // (shards + 1))


def build_tiny(
    model_type: str, path: str | Path, *, layout: str = "per-expert", shards: int = 3, seed: int = 0
) -> Path:
    """Save a tiny random `model_type` checkpoint in `layout` ("per-expert" or "fused") as ≥ `shards` shards."""
    if layout not in LAYOUTS[model_type]:
        raise ValueError(f"{model_type} has no {layout!r} layout on disk (choose from {LAYOUTS[model_type]})")
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    _randomise(model, torch.Generator().manual_seed(seed))
    model.eval()
    original_format = layout == "per-expert" or model_type in NATIVE_FUSED
    model.save_pretrained(path, max_shard_size=_shard_size(model, shards), save_original_format=original_format)
    written = len(list(path.glob("*.safetensors")))
    if written < shards:
        raise RuntimeError(f"{path}: {written} shards written, wanted at least {shards}")
    names = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    if any(re.search(r"\.(experts\.gate_up_proj|input_linear\.weight)$", n) for n in names) != (layout == "fused"):
        raise RuntimeError(f"{path}: transformers did not write {layout} expert tensors")
    (path / "tokenizer_config.json").write_text("{}\n")
    (path / "README.md").write_text(f"# tiny {model_type} ({layout})\n")
    return path


def read_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors header without `__metadata__`, and the offset where its data section starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def take_bytes(raw: bytes, shape: list[int], ids: list[int], axis: int = 0) -> bytes:
    """The stored bytes of a tensor restricted to `ids` along `axis` (any dtype of whole bytes)."""
    arr = np.frombuffer(raw, np.uint8).reshape(*shape[: axis + 1], -1)
    return np.take(arr, ids, axis=axis).tobytes()


def checkpoint_bytes(path: str | Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor of a checkpoint folder (index or single file): name -> (dtype, shape, bytes)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out = {}
    for shard in shards:
        header, start = read_header(path / shard)
        data = (path / shard).read_bytes()[start:]
        for name, entry in header.items():
            b, e = entry["data_offsets"]
            out[name] = (entry["dtype"], entry["shape"], data[b:e])
    return out


def write_checkpoint(path: str | Path, config: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    """A checkpoint folder written directly with safetensors: one shard per dict, plus an index if several."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    total = 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def folder_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def add_fake_mtp_layer(path: str | Path) -> int:
    """Append a copy of the last MoE layer as MTP layer `num_hidden_layers` in a new shard; returns its index.

    transformers never builds the DeepSeek-V3 MTP layer, so this stands in for one. Shards are
    renamed `model-0000i-of-0000{n+1}` and the index is rewritten to match.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    mtp = int(config["num_hidden_layers"])
    index = json.loads((path / INDEX_NAME).read_text())
    last = max(moe_layers(path))
    src_prefix, dst_prefix = f"model.layers.{last}.", f"model.layers.{mtp}."
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(path / shard).items():
            if name.startswith(src_prefix):
                tensors[dst_prefix + name[len(src_prefix):]] = t
    old = sorted(set(index["weight_map"].values()))
    total = len(old) + 1
    renames = {s: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, s in enumerate(old)}
    for s, new in renames.items():
        (path / s).rename(path / new)
    new_shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(tensors, path / new_shard, metadata={"format": "pt"})
    weight_map = {n: renames[s] for n, s in index["weight_map"].items()}
    weight_map.update({n: new_shard for n in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"]["total_size"] = sum(
        e - b for s in set(weight_map.values()) for entry in read_header(path / s)[0].values()
        for b, e in [entry["data_offsets"]]
    )
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return mtp


@contextlib.contextmanager
def _masked_routers(model: PreTrainedModel, drop: dict[int, list[int]], mask_value: float) -> Iterator[None]:
    """Add `mask_value` to dropped experts' router logits; set their selection-only biases to -inf.

    Router logits come from `F.linear(x, router.weight[, bias])`; `F.linear` is patched so that a
    call using a masked router's own weight gets the mask added to its output (after any bias),
    and every router call is checked to have gone through it. Correction biases
    (deepseek_v3/glm4_moe `e_score_correction_bias`, ernie `moe_statics`) only pick experts, so
    -inf there keeps a masked expert out of selection whatever its sigmoid/softmax score is.
    """
    spec = get_spec(model.config.model_type)
    blocks = moe_blocks(model)
    masks: dict[int, torch.Tensor] = {}  # data_ptr of router weight -> additive logit mask
    restore: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []
    calls = {"router": 0, "masked": 0}
    for layer, ids in drop.items():
        if layer not in blocks:
            raise ValueError(f"layer {layer} has no MoE block (MoE layers: {sorted(blocks)})")
        router = getattr(blocks[layer], spec.router_module)
        mask = torch.zeros(router.weight.shape[0])
        mask[ids] = mask_value
        masks[router.weight.data_ptr()] = mask
        for name, t in [*router.named_parameters(), *router.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                restore.append((t, t.detach().clone()))
                with torch.no_grad():
                    t[..., ids] = float("-inf")
        hooks.append(router.register_forward_pre_hook(lambda *_: calls.__setitem__("router", calls["router"] + 1)))

    original_linear: Callable = torch.nn.functional.linear

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = original_linear(input, weight, bias)
        mask = masks.get(weight.data_ptr())
        if mask is not None:
            calls["masked"] += 1
            out = out + mask.to(out.dtype)
        return out

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original_linear
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for t, saved in restore:
                t.copy_(saved)
    if calls["masked"] != calls["router"]:
        raise RuntimeError(f"masked {calls['masked']} of {calls['router']} router calls: logits not from F.linear")


def load_model(model_dir: str | Path) -> PreTrainedModel:
    """A checkpoint as a float32 eval-mode model."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def masked_logits(model_dir: str | Path, drop: dict[int, list[int]], input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the ORIGINAL model with the dropped experts' router logits masked out.

    Layers at or beyond `num_hidden_layers` (MTP) are not run by transformers and are ignored.
    """
    model = load_model(model_dir)
    mask_value = get_spec(model.config.model_type).mask_value
    main = {layer: ids for layer, ids in drop.items() if layer < model.config.num_hidden_layers}
    with torch.no_grad(), _masked_routers(model, main, mask_value):
        return model(input_ids).logits
