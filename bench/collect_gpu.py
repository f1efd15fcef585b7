"""Collector benchmark on a GPU (issue 4): plain forward vs `collect`, and streaming memory.

Builds a randomly initialised Qwen3-MoE of about 2.7B parameters in bf16, saves it, then on
the same batches measures
  1. tokens/s of a plain forward of the base model (transformers' default experts kernel),
  2. tokens/s of the same forward instrumented exactly as `collect` instruments it (every default
     statistic, token_bits included), and with `--histogram`,
  3. peak GPU memory of the full model vs `collect --stream-layers` (hidden states between layers
     on the GPU, and on the CPU), next to one decoder layer's parameter bytes, the hidden states
     kept between layers, and the activation peak of a plain forward of one batch.

  python bench/collect_gpu.py --data DIR_OR_JSONL --tokenizer DIR --workdir /tmp/cb --out $OUT/collect_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(workdir: Path, tokenizer_dir: Path, layers: int, experts: int) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    path = workdir / "model"
    if (path / "config.json").exists():
        return path
    cfg = Qwen3MoeConfig(
        vocab_size=8192, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, path / f.name)
    del model
    torch.cuda.empty_cache()
    return path


def timed_loop(fn, batches: list[torch.Tensor]) -> float:
    """Tokens/s over all batches but the first (warm-up)."""
    fn(batches[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    torch.cuda.synchronize()
    return sum(b.numel() for b in batches[1:]) / (time.perf_counter() - t0)


def compare_paths(inst) -> float:
    """Largest relative difference between the Triton and the torch accumulation on random assignments."""
    from surgery.collect import accumulator as accmod
    from surgery.collect.accumulator import Assignments, LayerAccumulator

    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, n = 48, 2048, 768, 20000
    expert = torch.sort(torch.randint(0, e, (n,), device="cuda", generator=gen)).values
    a = Assignments(expert, torch.bincount(expert, minlength=e),
                    torch.randn(n, h, device="cuda", generator=gen).bfloat16(),
                    torch.rand(n, device="cuda", generator=gen), torch.rand(n, device="cuda", generator=gen),
                    torch.randn(n, i, device="cuda", generator=gen).bfloat16(),
                    torch.randn(n, h, device="cuda", generator=gen).bfloat16())
    fused = LayerAccumulator(e, h, i, "cuda")
    fused.add_assignments(a)
    plain = LayerAccumulator(e, h, i, "cuda")
    saved = accmod.segment_sums.available
    accmod.segment_sums.available = lambda device: False
    try:
        plain.add_assignments(a)
    finally:
        accmod.segment_sums.available = saved
    t_tok, k = 4096, 8
    idx = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t_tok)])
    gates = torch.rand(t_tok, k, device="cuda", generator=gen)
    outs = torch.randn(t_tok, k, h, device="cuda", generator=gen).bfloat16()
    fused.add_pairs(idx, gates, outs)
    on_cpu = LayerAccumulator(e, h, i, "cpu")  # float64 reference for the Gram and co-selection
    on_cpu.add_pairs(idx.cpu(), gates.cpu(), outs.cpu())
    plain.sums["gram"], plain.sums["coselect"] = on_cpu.sums["gram"].cuda(), on_cpu.sums["coselect"].cuda()
    worst = 0.0
    for name, t in fused.sums.items():
        ref = plain.sums[name]
        worst = max(worst, ((t - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return worst


TILES = [{"BLOCK_D": 128, "BLOCK_R": 16, "num_warps": 4}, {"BLOCK_D": 128, "BLOCK_R": 32, "num_warps": 4},
         {"BLOCK_D": 256, "BLOCK_R": 16, "num_warps": 4}, {"BLOCK_D": 128, "BLOCK_R": 32, "num_warps": 8},
         {"BLOCK_D": 64, "BLOCK_R": 32, "num_warps": 4}, {"BLOCK_D": 256, "BLOCK_R": 8, "num_warps": 4}]


def tile_sweep(experts: int, k: int, tokens: int) -> list[dict]:
    """Microseconds per segment_sums call (the collector's three per layer) for a few block shapes."""
    from surgery.collect import segment_sums

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = tokens * k
    expert = torch.sort(torch.randint(0, experts, (n,), device="cuda", generator=gen)).values
    counts = torch.zeros(experts, dtype=torch.long, device="cuda").scatter_add_(0, expert, torch.ones_like(expert))
    f, h = (torch.randn(n, d, device="cuda", generator=gen).bfloat16() for d in (2048, 768))
    w = torch.rand(n, device="cuda", generator=gen)
    calls = [lambda t: segment_sums.segment_sums(f, counts, a=w, with_sum=True, tile=t),
             lambda t: segment_sums.segment_sums(f, counts, b=w, tile=t),
             lambda t: segment_sums.segment_sums(h, counts, b=w, tile=t)]
    rows = []
    for tile in TILES:
        for c in calls:
            c(tile)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            for c in calls:
                c(tile)
        torch.cuda.synchronize()
        rows.append({**tile, "us_per_layer": (time.perf_counter() - t0) / 20 * 1e6})
    return rows


def profile_batch(label: str, fn, batch: torch.Tensor) -> None:
    """Print the top GPU ops, and the top ops by CPU time (host syncs show there), of one batch."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"== {label}: one batch")
    print(events.table(sort_by="self_cuda_time_total", row_limit=25))
    print(events.table(sort_by="cpu_time_total", row_limit=15))


def ablation(model, base, batches, vocab, instrumented) -> dict[str, float]:
    """tokens/s of `collect` with one part of the work switched off at a time (monkeypatched no-ops)."""
    from unittest import mock

    from surgery.architectures import get_spec
    from surgery.collect import accumulator as accmod
    from surgery.collect.hooks import Instrument

    noop = lambda *a, **k: None  # noqa: E731
    variants = {
        "no_token_bits": ({}, None),
        "no_pairs": ({"add_pairs": noop}, vocab),
        "no_assignments": ({"add_assignments": noop}, vocab),
        "no_pairs_no_assignments": ({"add_pairs": noop, "add_assignments": noop}, vocab),
    }
    out = {}
    for name, (patches, v) in variants.items():
        with mock.patch.multiple(accmod.LayerAccumulator, **patches) if patches else contextlib.nullcontext():
            inst = Instrument(model, get_spec("qwen3_moe"), torch.device("cuda"), 3e-2, vocab_size=v)
            out[name] = timed_loop(instrumented(inst), batches)
            inst.restore()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/collect-bench"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=48)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="Print the top GPU ops of one instrumented batch.")
    ap.add_argument("--ablate", action="store_true",
                    help="Also time collect with parts of the statistics switched off (where the time goes).")
    ap.add_argument("--no-stream", action="store_true", help="Skip the streaming memory runs.")
    ap.add_argument("--tiles", action="store_true", help="Time the segment-sums kernel for a few block shapes first.")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.architectures import get_spec
    from surgery.collect.hooks import Instrument
    from surgery.model.data import build_sequences

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.tiles:
        sweep = tile_sweep(args.experts, 8, args.batch_size * args.seq_len)
        print(json.dumps(sweep, indent=1))
        if args.out:
            args.out.with_name("tiles.json").write_text(json.dumps(sweep, indent=1))
    path = build(args.workdir, args.tokenizer, args.layers, args.experts)
    tok = AutoTokenizer.from_pretrained(path)
    ids = build_sequences(args.data, tok, args.samples, args.seq_len, 0).input_ids
    batches = [b.cuda() for b in ids.split(args.batch_size)]
    result: dict = {"gpu": torch.cuda.get_device_name(), "samples": len(ids), "seq_len": args.seq_len,
                    "batch_size": args.batch_size}

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    result["params"] = sum(p.numel() for p in model.parameters())
    base = model.get_decoder()
    layer_bytes = sum(p.numel() * p.element_size() for p in base.layers[0].parameters())
    result["decoder_layer_mib"] = layer_bytes / 2**20
    with torch.no_grad():
        result["plain_tokens_per_s"] = timed_loop(lambda b: base(input_ids=b, use_cache=False), batches)
        result["full_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        for bs in {args.batch_size, 1}:  # what one batch of a plain forward needs beyond the weights
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            base(input_ids=batches[0][:bs], use_cache=False)
            result[f"plain_activation_peak_mib_bs{bs}"] = (torch.cuda.max_memory_allocated() - held) / 2**20
        vocab = model.config.vocab_size
        if args.profile:
            profile_batch("plain", lambda b: base(input_ids=b, use_cache=False), batches[1])

        def instrumented(inst):
            def run(b):
                inst.set_tokens(b)
                base(input_ids=b, use_cache=False)
            return run

        inst = Instrument(model, get_spec("qwen3_moe"), torch.device("cuda"), 3e-2, vocab_size=vocab, histogram=True)
        result["collect_histogram_tokens_per_s"] = timed_loop(instrumented(inst), batches)
        inst.restore()
        inst = Instrument(model, get_spec("qwen3_moe"), torch.device("cuda"), 3e-2, vocab_size=vocab)
        result["collect_tokens_per_s"] = timed_loop(instrumented(inst), batches)
        if args.profile:
            profile_batch("collect", instrumented(inst), batches[1])
        inst.restore()
        if args.ablate:
            result["ablation_tokens_per_s"] = ablation(model, base, batches, vocab, instrumented)
    result["collect_over_plain"] = result["collect_tokens_per_s"] / result["plain_tokens_per_s"]
    result["collect_histogram_over_plain"] = result["collect_histogram_tokens_per_s"] / result["plain_tokens_per_s"]
    result["fused_vs_torch_max_rel_diff"] = compare_paths(inst)
    del model, base, inst
    if args.no_stream:
        print(json.dumps(result, indent=1))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    # Streaming runs in a fresh process so that its peak memory is its own; at the benchmark's batch size and at 1,
    # hidden states between layers on the GPU (auto: they fit), and at the benchmark's batch size on the CPU.
    store_mib = len(ids) * args.seq_len * 2048 * 2 / 2**20
    for bs, where, tag in ((args.batch_size, "auto", "stream"), (1, "auto", "stream_bs1"),
                           (args.batch_size, "cpu", "stream_cpu_hidden")):
        code = (
            "import json, sys, time, torch; from surgery.collect.run import collect; t0 = time.perf_counter(); "
            f"collect({str(path)!r}, {args.data!r}, {str(args.workdir / 'stream.safetensors')!r}, samples={args.samples}, "
            f"seq_len={args.seq_len}, batch_size={bs}, holdout=0, device='cuda', dtype='bfloat16', "
            f"stream_layers=True, hidden_states={where!r}, progress=False); "
            "print(json.dumps({'seconds': time.perf_counter() - t0, "
            "'peak_gpu_mib': torch.cuda.max_memory_allocated() / 2**20}))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            result[f"{tag}_error"] = proc.stderr[-2000:]
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        result[f"{tag}_seconds"] = out["seconds"]
        result[f"{tag}_peak_gpu_mib"] = out["peak_gpu_mib"]
        result[f"{tag}_peak_over_layer"] = out["peak_gpu_mib"] / result["decoder_layer_mib"]
        result[f"{tag}_hidden_states_mib_per_batch"] = bs * args.seq_len * 2048 * 2 / 2**20
        # the target: 1.5 x one decoder layer + activations, where activations = the hidden states kept
        # between layers when they are on the GPU + what a plain forward of one such batch needs beyond its weights
        act = (store_mib if where == "auto" else 0.0) + result[f"plain_activation_peak_mib_bs{bs}"]
        result[f"{tag}_target_mib"] = 1.5 * result["decoder_layer_mib"] + act
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
