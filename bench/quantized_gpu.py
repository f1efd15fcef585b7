"""Quantized checkpoints on one GPU (issue 19): wall time, peak host RSS and peak GPU memory of every command.

(a) gpt-oss-20b geometry in MXFP4 (the published config: 24 layers, 32 experts, top-4, hidden 2880, expert
width 2880, 64 heads of 64, 8 KV heads, vocab 201088), built shard by shard with random codes (numpy random
e2m1 nibbles; e8m0 scales 2^-8..2^-7, so weights are finite and O(0.02)), then, each in its own process:
collect in memory, collect --stream-layers, a plain forward of the same model (dequantized on load, the same
tokens), prune --stats (25%), verify, eval, and heal --kd-tokens (in --steps only when asked: heal of quantized
students comes with its own change).
(b) DeepSeek-V3 layer geometry in FP8 e4m3 with 128x128 F32 `weight_scale_inv` (hidden 7168, MLA, 256 routed
experts + 1 shared of width 2048, top-8, n_group 8, topk_group 4): the first dense layer plus two MoE layers,
vocab reduced to --ds-vocab (default 32768 instead of 129280, to save disk; the extrapolation counts the real
vocab). collect --stream-layers (seconds per decoder layer, peak GPU), prune at 25% (group-respecting) against
`cp -r` of the same folder, and the extrapolation to the full 61-layer model (3 dense + 58 MoE layers).

Each part's folder is deleted when the part ends (--keep keeps them): (a) needs ~25 GB of disk, (b) ~47 GB.
One JSON line per step on stdout (and appended to --out).

  python bench/quantized_gpu.py --workdir /tmp/qg --out $OUT/quantized_gpu.jsonl          # the issue's models
  python bench/quantized_gpu.py --tiny --device cpu --workdir /tmp/qg-tiny                # end to end on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import emit
from memory_gpu import run_step, text  # puts the repository and tests/ on sys.path

A_STEPS = ("collect", "stream", "forward", "prune", "verify", "eval", "heal")
B_STEPS = ("ds-stream", "ds-prune")
DEFAULT_STEPS = ",".join(s for s in A_STEPS + B_STEPS if s != "heal")
DS_FULL = {"dense_layers": 3, "moe_layers": 58, "vocab": 129280}  # DeepSeek-V3 / R1 (MTP layer not counted)


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


# --- one step, in its own process ----------------------------------------------------------------------------


def _time_layers() -> list[list[float]]:
    """Wrap stream_forward so each decoder layer's end is stamped (after the device finished it); one list
    of stamps per pass (collect streams the model once for its batches, once for the held-out ones)."""
    import torch

    import surgery.model.streaming as streaming

    passes: list[list[float]] = []
    original = streaming.stream_forward

    def timed(*args, after_layer=None, on_loaded=None, **kwargs):
        stamps: list[float] = []
        passes.append(stamps)

        def loaded():
            stamps.append(time.perf_counter())
            if on_loaded:
                on_loaded()

        def done(i):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if after_layer:
                after_layer(i)

        return original(*args, after_layer=done, on_loaded=loaded, **kwargs)

    streaming.stream_forward = timed
    return passes


def forward_step(model: str, device: str, samples: int, seq_len: int, batch: int) -> None:
    """A plain forward of the whole model (loaded dequantized, bf16) over the tokens collect reads."""
    import resource

    import torch

    from surgery.model.load import load_model

    lm = load_model(model, device, torch.bfloat16)
    vocab = min(256, lm.config.vocab_size)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, samples, batch):
            lm(input_ids=ids[b:b + batch].to(device), use_cache=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "load_s": round(lm.moe_surgery_load_seconds, 2), "compute_s": round(seconds, 3), "tokens": ids.numel(),
        "tokens_per_s": round(ids.numel() / seconds, 1)}), flush=True)


def child(spec: dict) -> None:
    if spec.get("forward"):
        forward_step(**spec["forward"])
        return
    passes = _time_layers() if spec.get("layer_times") else None
    run_step(spec["argv"], spec.get("record"))
    if passes:  # seconds of each decoder layer, summed over the passes
        per_pass = [[b - a for a, b in zip(stamps, stamps[1:])] for stamps in passes]
        print(json.dumps({"layer_s": [round(sum(x), 3) for x in zip(*per_pass)], "passes": len(per_pass)}),
              flush=True)


def step(name: str, spec: dict, out: Path | None) -> dict:
    """Run one step in a fresh process; its JSON lines merged into one row, with the process's wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--step-json", json.dumps(spec)], capture_output=True, text=True)
    row = {"step": name}
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row.update(json.loads(line))
    row["process_wall_s"] = round(time.perf_counter() - t0, 2)
    emit(row, out)
    return row


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --- the two parts -------------------------------------------------------------------------------------------


def part_a(args, steps: list[str]) -> None:
    work = args.workdir / "gpt-oss"
    t0 = time.perf_counter()
    config = gpt_oss_config(args.tiny)
    model = build_gpt_oss(work / "model", config, args.builder)
    emit({"step": "build gpt-oss MXFP4", "bytes": folder_bytes(model), "wall_s": round(time.perf_counter() - t0, 1)},
         args.out)
    data = text(work / "calib.jsonl", (args.samples + 32) * args.seq_len + args.eval_tokens)
    common = ["-d", str(data), "--device", args.device, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size)]
    stats, streamed, pruned = work / "stats.safetensors", work / "stats-streamed.safetensors", work / "pruned"
    rows = {}
    if "collect" in steps:
        rows["collect"] = step("gpt-oss collect (in memory)", {"argv": ["collect", str(model), *common, "-o", str(stats),
                                                               "--overwrite", "--no-stream-layers"],
                                                               "record": f"stats:{stats}"}, args.out)
    if "stream" in steps:
        rows["stream"] = step("gpt-oss collect --stream-layers", {
            "argv": ["collect", str(model), *common, "-o", str(streamed), "--overwrite", "--stream-layers"],
            "record": f"stats:{streamed}", "layer_times": True}, args.out)
    if "forward" in steps:
        rows["forward"] = step("gpt-oss plain forward (bf16, dequantized on load)", {"forward": dict(
            model=str(model), device=args.device, samples=args.samples, seq_len=args.seq_len,
            batch=args.batch_size)}, args.out)
    base = rows.get("forward", {}).get("tokens_per_s")
    for key in ("collect", "stream"):
        if base and rows.get(key, {}).get("tokens_per_s"):
            emit({"ratio": f"{key} / plain forward tokens/s", "value": round(rows[key]["tokens_per_s"] / base, 3)},
                 args.out)
    stats = stats if stats.exists() else streamed
    if "prune" in steps:
        shutil.rmtree(pruned, ignore_errors=True)
        step("gpt-oss prune --stats (25%)", {"argv": ["prune", str(model), "--stats", str(stats), "--criterion",
                                                      "frequency", "--ratio", "0.25", "-o", str(pruned)]}, args.out)
    if "verify" in steps:
        step("gpt-oss verify", {"argv": ["verify", str(pruned)]}, args.out)
    if "eval" in steps:
        step("gpt-oss eval (pruned)", {"argv": ["eval", str(pruned), "-d", str(data), "--device", args.device,
                                                "--max-tokens", str(args.eval_tokens), "--seq-len",
                                                str(args.seq_len), "--json"], "record": "eval:"}, args.out)
    if "heal" in steps:
        healed = work / "healed"
        shutil.rmtree(healed, ignore_errors=True)
        step(f"gpt-oss heal --kd-tokens {args.kd_tokens}", {"argv": [
            "heal", str(pruned), "--teacher", str(model), "-d", str(data), "-o", str(healed), "--kd-tokens",
            str(args.kd_tokens), "--seq-len", str(args.seq_len), "--device", args.device],
            "record": f"heal:{healed}"}, args.out)
    if not args.keep:
        shutil.rmtree(work)


def _layer_bytes(model: Path) -> dict[str, int]:
    """Bytes on disk of the embeddings/head, of the dense layer and of one MoE layer (from the headers)."""
    from surgery.io import Checkpoint

    out = {"frame": 0, "dense": 0, "moe": 0}
    with Checkpoint(model) as ckpt:
        for name in ckpt.names():
            part = "frame" if ".layers." not in name else ("dense" if ".layers.0." in name else
                                                           "moe" if ".layers.1." in name else None)
            if part:
                out[part] += ckpt.info(name).nbytes
    return out


def part_b(args, steps: list[str]) -> None:
    work = args.workdir / "deepseek"
    t0 = time.perf_counter()
    config = deepseek_config(args.tiny, args.ds_vocab)
    model = build_deepseek(work / "model", config, args.builder)
    size = folder_bytes(model)
    emit({"step": "build DeepSeek-V3 FP8 (dense + 2 MoE layers)", "bytes": size, "vocab": config["vocab_size"],
          "wall_s": round(time.perf_counter() - t0, 1)}, args.out)
    data = text(work / "calib.jsonl", (args.samples + 32) * args.seq_len)
    stats = work / "stats.safetensors"
    row = {}
    if "ds-stream" in steps:
        row = step("DeepSeek-V3 collect --stream-layers", {"argv": [
            "collect", str(model), "-d", str(data), "--device", args.device, "--samples", str(args.samples),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "-o", str(stats), "--overwrite",
            "--stream-layers"], "record": f"stats:{stats}", "layer_times": True}, args.out)
    if "ds-prune" in steps:
        copy, pruned = work / "copy", work / "pruned"
        shutil.rmtree(copy, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
        subprocess.run(["sync"], check=False)
        emit({"step": "DeepSeek-V3 cp -r", "bytes": size, "wall_s": round(time.perf_counter() - t, 2)}, args.out)
        shutil.rmtree(copy)
        shutil.rmtree(pruned, ignore_errors=True)
        if stats.exists():
            argv = ["prune", str(model), "--stats", str(stats), "--criterion", "frequency", "--ratio", "0.25"]
        else:
            argv = ["prune", str(model), "--criterion", "weight_norm", "--ratio", "0.25"]
        step("DeepSeek-V3 prune 25% (group-respecting)", {"argv": [*argv, "-o", str(pruned)]}, args.out)
        subprocess.run(["sync"], check=False)
    _extrapolate(args, model, config, row)
    if not args.keep:
        shutil.rmtree(work)


def _extrapolate(args, model: Path, config: dict, row: dict) -> None:
    """The full model: 3 dense + 58 MoE layers streamed one at a time, at the measured seconds per layer."""
    layer_s = row.get("layer_s") or []
    if len(layer_s) != 3 or not row.get("wall_s"):  # the dense layer and two MoE layers
        return
    dense_s, moe_s = layer_s[0], sum(layer_s[1:]) / 2
    rest_s = row["wall_s"] - sum(layer_s)  # start-up, embeddings and head, tokenizing, writing the statistics
    full_s = rest_s + DS_FULL["dense_layers"] * dense_s + DS_FULL["moe_layers"] * moe_s
    b = _layer_bytes(model)
    full_bytes = (b["frame"] * DS_FULL["vocab"] / config["vocab_size"] + DS_FULL["dense_layers"] * b["dense"]
                  + DS_FULL["moe_layers"] * b["moe"])
    result = {"step": "DeepSeek-V3 full model, extrapolated", "seconds_per_moe_layer": round(moe_s, 2),
              "seconds_dense_layer": round(dense_s, 2), "tokens": row.get("tokens"),
              "collect_stream_full_s": round(full_s, 1), "collect_stream_full_min": round(full_s / 60, 1),
              "full_bytes_gb": round(full_bytes / 1e9, 1), "gpu_peak_gib_2_moe_layers": row.get("gpu_peak_gib")}
    emit(result, args.out)
    print(f"DeepSeek-V3 (61 layers: 3 dense + 58 MoE, MTP not run), {row.get('tokens')} tokens, one GPU: "
          f"collect --stream-layers ~ {full_s / 60:.1f} min ({moe_s:.1f} s per MoE layer, {dense_s:.1f} s per dense "
          f"layer); peak GPU stays that of two layers ({row.get('gpu_peak_gib')} GiB measured); "
          f"{full_bytes / 1e9:.0f} GB of weights read.", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-json", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moe-quantized-gpu"))
    ap.add_argument("--out", type=Path, help="Append every step's JSON line here.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="Small sizes, same fields and steps (a CPU run end to end).")
    ap.add_argument("--samples", type=int, default=16, help="Calibration sequences for collect and the forward.")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--kd-tokens", type=int, default=1_000_000)
    ap.add_argument("--ds-vocab", type=int, default=32768, help="DeepSeek-V3 vocabulary (published: 129280).")
    ap.add_argument("--steps", default=DEFAULT_STEPS, help=f"Comma-separated, from {', '.join(A_STEPS + B_STEPS)} "
                    f"(default: all but heal).")
    ap.add_argument("--keep", action="store_true", help="Keep the built and pruned checkpoints.")
    args = ap.parse_args()
    if args.step_json:
        child(json.loads(args.step_json))
        return
    if args.tiny:
        args.samples, args.seq_len, args.batch_size = min(args.samples, 4), min(args.seq_len, 64), 2
        args.eval_tokens, args.kd_tokens = min(args.eval_tokens, 256), min(args.kd_tokens, 512)
    args.builder = args.device if args.device.startswith("cuda") else "cpu"
    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    unknown = sorted(set(steps) - set(A_STEPS + B_STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}")
    t0 = time.perf_counter()
    if set(steps) & set(A_STEPS):
        part_a(args, steps)
    if set(steps) & set(B_STEPS):
        part_b(args, steps)
    emit({"step": "total", "wall_s": round(time.perf_counter() - t0, 1)}, args.out)


if __name__ == "__main__":
    main()
