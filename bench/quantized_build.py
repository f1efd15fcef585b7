"""Random quantized checkpoints in published geometry for bench/quantized_gpu.py (issue 19): gpt-oss-20b in
MXFP4 and DeepSeek-V3's first three layers in FP8, written shard by shard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# --- geometry ------------------------------------------------------------------------------------------------


def gpt_oss_config(tiny: bool) -> dict:
    """gpt-oss-20b's published config.json (tiny: the same fields, small sizes)."""
    g = dict(hidden=64, layers=2, experts=8, top_k=2, heads=4, kv=2, head_dim=16, vocab=256) if tiny else \
        dict(hidden=2880, layers=24, experts=32, top_k=4, heads=64, kv=8, head_dim=64, vocab=201088)
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "attention_dropout": 0.0, "eos_token_id": 1, "pad_token_id": 0, "experts_per_token": g["top_k"],
        "head_dim": g["head_dim"], "hidden_act": "silu", "hidden_size": g["hidden"], "initial_context_length": 4096,
        "initializer_range": 0.02, "intermediate_size": g["hidden"],
        "layer_types": ["sliding_attention", "full_attention"] * (g["layers"] // 2),
        "max_position_embeddings": 131072, "num_attention_heads": g["heads"], "num_experts_per_tok": g["top_k"],
        "num_hidden_layers": g["layers"], "num_key_value_heads": g["kv"], "num_local_experts": g["experts"],
        "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
        "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "use_cache": True, "vocab_size": g["vocab"], "dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }


def deepseek_config(tiny: bool, vocab: int) -> dict:
    """DeepSeek-V3's published config.json, three layers (first dense, two MoE), no MTP layer."""
    g = dict(hidden=256, inter=512, moe=128, experts=32, heads=4, q_lora=128, kv_lora=128, vocab=256) if tiny else \
        dict(hidden=7168, inter=18432, moe=2048, experts=256, heads=128, q_lora=1536, kv_lora=512, vocab=vocab)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": g["vocab"],
        "hidden_size": g["hidden"], "intermediate_size": g["inter"], "moe_intermediate_size": g["moe"],
        "num_hidden_layers": 3, "num_nextn_predict_layers": 0, "num_attention_heads": g["heads"],
        "num_key_value_heads": g["heads"], "n_shared_experts": 1, "n_routed_experts": g["experts"],
        "routed_scaling_factor": 2.5, "kv_lora_rank": g["kv_lora"], "q_lora_rank": g["q_lora"],
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
        "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }


# --- building ------------------------------------------------------------------------------------------------


class Shards:
    """Writes a checkpoint a shard at a time (one shard's tensors at most in host memory), then its index."""

    def __init__(self, path: Path, count: int):
        self.path, self.count, self.done, self.weight_map, self.total = path, count, 0, {}, 0
        path.mkdir(parents=True, exist_ok=True)

    def write(self, tensors: dict) -> None:
        from safetensors.torch import save_file

        self.done += 1
        name = f"model-{self.done:05d}-of-{self.count:05d}.safetensors"
        save_file(tensors, self.path / name, metadata={"format": "pt"})
        self.weight_map.update({n: name for n in tensors})
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote {name} ({self.total / 2**30:.1f} GiB so far)", file=sys.stderr, flush=True)

    def finish(self, config: dict) -> Path:
        from tiny_tokenizer import save_tiny_tokenizer

        assert self.done == self.count, (self.done, self.count)
        (self.path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
        (self.path / "config.json").write_text(json.dumps(config, indent=1))
        save_tiny_tokenizer(self.path, vocab_size=min(256, config["vocab_size"]))
        return self.path


def _randn(device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=0.02, dtype=torch.bfloat16):
        return (torch.randn(shape, generator=gen, device=device) * std).to(dtype).cpu()

    return rnd


def build_gpt_oss(path: Path, config: dict, device: str, layers_per_shard: int = 3) -> Path:
    """MXFP4 experts (`*_blocks` U8 [E, rows, cols/32, 16], `*_scales` U8 [E, rows, cols/32], rows = outputs),
    everything else bf16."""
    import torch

    if (path / "config.json").exists():
        return path
    rnd = _randn(device)
    rng = np.random.default_rng(0)
    h, e, hd = config["hidden_size"], config["num_local_experts"], config["head_dim"]
    heads, kv, n_layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    groups = -(-n_layers // layers_per_shard)
    out = Shards(path, groups + 1)
    out.write({"model.embed_tokens.weight": rnd(config["vocab_size"], h),
               "lm_head.weight": rnd(config["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})

    def mx(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.from_numpy(rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8))
        return blocks, torch.from_numpy(rng.integers(120, 122, (e, rows, cols // 32), dtype=np.uint8))

    for s in range(groups):
        tensors = {}
        for layer in range(s * layers_per_shard, min(n_layers, (s + 1) * layers_per_shard)):
            p = f"model.layers.{layer}."
            zeros = lambda *n: torch.zeros(n, dtype=torch.bfloat16)  # noqa: E731
            tensors.update({
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rnd(heads * hd, h), p + "self_attn.q_proj.bias": zeros(heads * hd),
                p + "self_attn.k_proj.weight": rnd(kv * hd, h), p + "self_attn.k_proj.bias": zeros(kv * hd),
                p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.v_proj.bias": zeros(kv * hd),
                p + "self_attn.o_proj.weight": rnd(h, heads * hd), p + "self_attn.o_proj.bias": zeros(h),
                p + "self_attn.sinks": zeros(heads),
                p + "mlp.router.weight": rnd(e, h, std=1.5 / h ** 0.5), p + "mlp.router.bias": zeros(e),
                p + "mlp.experts.gate_up_proj_bias": zeros(e, 2 * h), p + "mlp.experts.down_proj_bias": zeros(e, h),
            })
            tensors[p + "mlp.experts.gate_up_proj_blocks"], tensors[p + "mlp.experts.gate_up_proj_scales"] = mx(2 * h, h)
            tensors[p + "mlp.experts.down_proj_blocks"], tensors[p + "mlp.experts.down_proj_scales"] = mx(h, h)
        out.write(tensors)
    return out.finish(config)


def build_deepseek(path: Path, config: dict, device: str, expert_shards: int = 4) -> Path:
    """FP8 e4m3 weights with F32 128x128 `weight_scale_inv`; norms, router, embeddings bf16, the router's
    `e_score_correction_bias` F32 (as published). Codes have exponents 6-7 (|w| in [0.5, 1.875]) and the
    scales are 0.015, so weights are O(0.02)."""
    import torch

    if (path / "config.json").exists():
        return path
    rnd = _randn(device)
    gen = torch.Generator(device=device).manual_seed(1)
    h, experts = config["hidden_size"], config["n_routed_experts"]
    heads, q_lora, kv_lora = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]

    def fp8(prefix: str, rows: int, cols: int) -> dict:
        r = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
        codes = ((r & 0x8F) | 0x30).view(torch.float8_e4m3fn).cpu()
        return {prefix + ".weight": codes,
                prefix + ".weight_scale_inv": torch.full((-(-rows // 128), -(-cols // 128)), 0.015)}

    def attention(p: str) -> dict:
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "self_attn.q_a_layernorm.weight": torch.ones(q_lora, dtype=torch.bfloat16),
             p + "self_attn.kv_a_layernorm.weight": torch.ones(kv_lora, dtype=torch.bfloat16)}
        t.update(fp8(p + "self_attn.q_a_proj", q_lora, h))
        t.update(fp8(p + "self_attn.q_b_proj", heads * qk, q_lora))
        t.update(fp8(p + "self_attn.kv_a_proj_with_mqa", kv_lora + config["qk_rope_head_dim"], h))
        t.update(fp8(p + "self_attn.kv_b_proj", heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv_lora))
        t.update(fp8(p + "self_attn.o_proj", h, heads * config["v_head_dim"]))
        return t

    def mlp(p: str, width: int) -> dict:
        return {**fp8(p + "gate_proj", width, h), **fp8(p + "up_proj", width, h), **fp8(p + "down_proj", h, width)}

    out = Shards(path, 2 + 2 * expert_shards)
    first = {"model.embed_tokens.weight": rnd(config["vocab_size"], h), **attention("model.layers.0."),
             **mlp("model.layers.0.mlp.", config["intermediate_size"])}
    out.write(first)
    per_shard = -(-experts // expert_shards)
    for layer in (1, 2):
        p = f"model.layers.{layer}."
        for s in range(expert_shards):
            tensors = {}
            if s == 0:
                tensors.update({**attention(p), **mlp(p + "mlp.shared_experts.", config["moe_intermediate_size"]),
                                p + "mlp.gate.weight": rnd(experts, h, std=1.5 / h ** 0.5),
                                p + "mlp.gate.e_score_correction_bias": torch.zeros(experts)})
            for x in range(s * per_shard, min(experts, (s + 1) * per_shard)):
                tensors.update(mlp(f"{p}mlp.experts.{x}.", config["moe_intermediate_size"]))
            out.write(tensors)
    out.write({"lm_head.weight": rnd(config["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    return out.finish(config)
