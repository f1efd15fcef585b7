"""Host and device memory, wall time and throughput of the commands that run a model (issue 20).

Builds a random Qwen3-MoE (default: the issue's 7.5B geometry, hidden 2048, 24 layers, 64 experts,
top-8, moe_intermediate 768, bf16, per-expert tensors as on the Hub, 8 shards) directly with
safetensors, one layer at a time, plus a character-level tokenizer and calibration text; then runs,
each step in its own process (so peak RSS is the step's own):

  collect (in memory), collect --stream-layers, prune --stats (25%), eval --reference, heal --kd-steps 0,
  and (step `refit`, not by default) prune --stats (25%) --calib-text: prune's default refit

and prints one JSON line per step: wall s, peak host RSS GiB, peak GPU GiB (torch.cuda.max_memory_allocated),
load s, compute s and tokens/s as the command recorded them; then the streamed / in-memory throughput ratio.

  python bench/memory_gpu.py --workdir /tmp/mg --out $OUT/memory_gpu.json                  # the issue's model
  python bench/memory_gpu.py --tiny --device cpu --workdir /tmp/mg-tiny                     # end to end on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WORDS = ("expert router token layer model prune gate weight sparse dense mixture of the a and quick brown "
         "fox jumps over lazy dogs 42 7 3.14 ( ) , ; : ! ?").split()


def geometry(args) -> dict:
    if args.tiny:
        return dict(hidden=64, layers=4, experts=8, top_k=2, inter=32, heads=4, kv_heads=2, head_dim=16,
                    vocab=256, shards=3)
    return dict(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k, inter=args.moe_inter,
                heads=16, kv_heads=4, head_dim=128, vocab=8192, shards=args.shards)


def build(path: Path, g: dict, device: str) -> Path:
    """The checkpoint, written shard by shard (a shard's tensors at most in memory at once)."""
    import torch
    from safetensors.torch import save_file

    from tiny_tokenizer import save_tiny_tokenizer

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, i_, e, hd = g["hidden"], g["inter"], g["experts"], g["head_dim"]
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "bfloat16",
        "vocab_size": g["vocab"], "hidden_size": h, "intermediate_size": 3 * h, "moe_intermediate_size": i_,
        "num_hidden_layers": g["layers"], "num_attention_heads": g["heads"], "num_key_value_heads": g["kv_heads"],
        "head_dim": hd, "num_experts": e, "num_experts_per_tok": g["top_k"], "norm_topk_prob": True,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "decoder_sparse_step": 1, "mlp_only_layers": [], "bos_token_id": 1,
        "eos_token_id": 1, "pad_token_id": 0, "initializer_range": 0.02,
    }
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    per_shard = -(-g["layers"] // g["shards"])
    weight_map, total = {}, 0
    n_shards = -(-g["layers"] // per_shard)
    for s in range(n_shards):
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = rnd(g["vocab"], h)
        if s == n_shards - 1:
            tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rnd(g["vocab"], h)
        for layer in range(s * per_shard, min(g["layers"], (s + 1) * per_shard)):
            p = f"model.layers.{layer}."
            ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
            tensors.update({
                p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
                p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd),
                p + "self_attn.q_proj.weight": rnd(g["heads"] * hd, h),
                p + "self_attn.k_proj.weight": rnd(g["kv_heads"] * hd, h),
                p + "self_attn.v_proj.weight": rnd(g["kv_heads"] * hd, h),
                p + "self_attn.o_proj.weight": rnd(h, g["heads"] * hd),
                p + "mlp.gate.weight": rnd(e, h, std=1.5 / h ** 0.5),
            })
            for x in range(e):
                for proj, shape in (("gate_proj", (i_, h)), ("up_proj", (i_, h)), ("down_proj", (h, i_))):
                    tensors[f"{p}mlp.experts.{x}.{proj}.weight"] = rnd(*shape)
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_tiny_tokenizer(path, vocab_size=min(256, g["vocab"]))
    return path


def text(path: Path, tokens: int) -> Path:
    """Character-level text: at least `tokens` characters (one token each), in documents of ~2000."""
    if path.exists() and path.stat().st_size > tokens * 1.2:
        return path
    rng = random.Random(0)
    with path.open("w") as f:
        written = 0
        while written < tokens * 1.3:
            doc = " ".join(rng.choice(WORDS) for _ in range(400))
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc)
    return path


# --- one step, in its own process ------------------------------------------------------------------------


def run_step(argv: list[str], record: str | None) -> None:
    """Run `moe-surgery argv` in this process; print {rss, gpu, load/compute/tokens from the record}."""
    import torch

    from surgery.cli import main

    cuda = torch.cuda.is_available()
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            main(argv, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    wall = time.perf_counter() - t0
    timing = {}
    if record:
        kind, _, where = record.partition(":")
        if kind == "stats":
            from stats_formats import StatsFile

            timing = StatsFile(where).calibration.get("timing", {})
        elif kind == "eval":
            timing = json.loads(out.getvalue())["timing"]
        elif kind == "heal":
            timing = json.loads((Path(where) / "pruning.json").read_text())["heal"].get("timing", {})
    print(json.dumps({
        "wall_s": round(wall, 2),
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "load_s": timing.get("load_seconds"), "compute_s": timing.get("compute_seconds"),
        "tokens": timing.get("tokens_processed"), "tokens_per_s": timing.get("tokens_per_second"),
    }), file=sys.__stdout__)


def step(name: str, argv: list[str], record: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--step-json", json.dumps({"argv": argv, "record": record})]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        result = {"step": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    else:
        result = {"step": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-json", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moe-memory-gpu"))
    ap.add_argument("--out", type=Path, help="Write every step's figures here as one JSON document.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="A 4-layer model of hidden size 64 (a CPU run end to end).")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=768)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64 * 2048, help="Calibration tokens for collect (held-out added).")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="eval --max-tokens.")
    ap.add_argument("--heal-tokens", type=int, default=16384)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--steps", default="collect,stream,prune,eval,heal")
    args = ap.parse_args()
    if args.step_json:
        spec = json.loads(args.step_json)
        run_step(spec["argv"], spec["record"])
        return
    if args.tiny:
        args.seq_len = min(args.seq_len, 128)
        args.tokens = min(args.tokens, 16 * 128)
        args.eval_tokens = min(args.eval_tokens, 1024)
        args.heal_tokens = min(args.heal_tokens, 1024)
    g = geometry(args)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    builder = args.device if args.device.startswith("cuda") else "cpu"
    model = build(work / ("model-tiny" if args.tiny else f"model-h{g['hidden']}-l{g['layers']}-e{g['experts']}"), g,
                  builder)
    samples = max(1, args.tokens // args.seq_len)
    data = text(work / "calib.jsonl", (samples + 32) * args.seq_len + args.heal_tokens)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(json.dumps({"built": str(model), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    common = ["-d", str(data), "--device", args.device, "--samples", str(samples), "--seq-len", str(args.seq_len)]
    results = {}
    stats = work / "stats.safetensors"
    pruned = work / "pruned"
    wanted = args.steps.split(",")
    if "collect" in wanted:
        results["collect"] = step("collect in memory", ["collect", str(model), *common, "-o", str(stats), "--overwrite",
                                                        "--no-stream-layers"], f"stats:{stats}")
    if "stream" in wanted:
        streamed = work / "stats-streamed.safetensors"
        results["stream"] = step("collect --stream-layers", ["collect", str(model), *common, "-o", str(streamed),
                                                              "--overwrite", "--stream-layers"], f"stats:{streamed}")
        if not stats.exists():
            stats = streamed
    if "prune" in wanted:
        import shutil

        shutil.rmtree(pruned, ignore_errors=True)
        results["prune"] = step("prune --stats (25%)", ["prune", str(model), "--stats", str(stats), "--criterion",
                                                        "frequency", "--ratio", "0.25", "-o", str(pruned)])
    if "refit" in wanted:  # issue 23: prune's default when calibration text is given (drop + refit)
        import shutil

        refitted = work / "pruned-refit"
        shutil.rmtree(refitted, ignore_errors=True)
        results["refit"] = step("prune --stats (25%) --calib-text: the default refit",
                                ["prune", str(model), "--stats", str(stats), "--criterion", "frequency", "--ratio",
                                 "0.25", "-o", str(refitted), "--calib-text", str(data), "--device", args.device],
                                f"heal:{refitted}")
        record = json.loads((refitted / "pruning.json").read_text()) if refitted.exists() else {}
        print(json.dumps({"refit": record.get("refit"), "heal_seconds": record.get("heal", {}).get("seconds"),
                          "layers": record.get("heal", {}).get("stages", [{}])[0].get("layers")}), flush=True)
    if "eval" in wanted:
        results["eval"] = step("eval --reference", ["eval", str(pruned), "-d", str(data), "--reference", str(model),
                                                    "--device", args.device, "--max-tokens", str(args.eval_tokens),
                                                    "--seq-len", str(min(512, args.seq_len)), "--json"], "eval:")
    if "heal" in wanted:
        import shutil

        healed = work / "healed"
        shutil.rmtree(healed, ignore_errors=True)
        results["heal"] = step("heal --kd-steps 0", ["heal", str(pruned), "--teacher", str(model), "-d", str(data),
                                                     "-o", str(healed), "--kd-steps", "0", "--no-synthesize",
                                                     "--local-steps", str(args.local_steps), "--tokens",
                                                     str(args.heal_tokens), "--seq-len", str(min(1024, args.seq_len)),
                                                     "--device", args.device], f"heal:{healed}")
    ratio = None
    mem, st = results.get("collect", {}), results.get("stream", {})
    if mem.get("tokens_per_s") and st.get("tokens_per_s"):
        ratio = round(st["tokens_per_s"] / mem["tokens_per_s"], 3)
    print(json.dumps({"streamed_over_in_memory_throughput": ratio}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"geometry": g, "bytes": size, "tokens": args.tokens, "steps": results,
                                        "streamed_over_in_memory_throughput": ratio}, indent=2))


if __name__ == "__main__":
    main()
