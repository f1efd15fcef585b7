"""Rewriter benchmark (issue 2): `cp -r` vs `moe-surgery prune` on a synthetic Mixtral-shaped bf16 checkpoint.

Usage:
  python bench/rewrite_bench.py --gb 4 --workdir bench/work     # builds, times, prints a Markdown row
  python bench/rewrite_bench.py --naive --workdir bench/work    # naive transformers path on a RAM-sized model

Random bytes stand in for weights (the rewriter never looks at values). Peak RSS comes from
`/usr/bin/time -v` around each command. Each timed command runs after `sync` and, when the
kernel allows it, after dropping the page cache, so cp and prune read from the same state.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

H, I, E, TOPK = 1024, 3584, 8, 2


def layer_tensors(layer: int) -> list[tuple[str, list[int]]]:
    p = f"model.layers.{layer}"
    out = [(f"{p}.input_layernorm.weight", [H]), (f"{p}.post_attention_layernorm.weight", [H])]
    out += [(f"{p}.self_attn.{n}.weight", [H, H]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    out.append((f"{p}.block_sparse_moe.gate.weight", [E, H]))
    for e in range(E):
        q = f"{p}.block_sparse_moe.experts.{e}"
        out += [(f"{q}.w1.weight", [I, H]), (f"{q}.w3.weight", [I, H]), (f"{q}.w2.weight", [H, I])]
    return out


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], rng: np.random.Generator) -> int:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = off
        while left:
            chunk = min(left, 64 << 20)
            f.write(rng.bytes(chunk))
            left -= chunk
    return off


def build(dst: Path, gb: float, shards: int = 8) -> None:
    per_layer = sum(int(np.prod(s)) * 2 for _, s in layer_tensors(0))
    layers = max(shards, round(gb * 1e9 / per_layer))
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    groups = np.array_split(np.arange(layers), shards)
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = [t for layer in group for t in layer_tensors(int(layer))]
        if s == 0:
            tensors = [("model.embed_tokens.weight", [32000, H])] + tensors
        if s == shards - 1:
            tensors += [("model.norm.weight", [H]), ("lm_head.weight", [32000, H])]
        total += write_shard(dst / name, tensors, rng)
        weight_map.update({t: name for t, _ in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": H, "intermediate_size": I,
           "num_local_experts": E, "num_experts_per_tok": TOPK, "num_hidden_layers": layers, "num_attention_heads": 8,
           "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "plan.json").write_text(json.dumps({"keep": {str(l): list(range(E - E // 4)) for l in range(layers)}}))


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, via /usr/bin/time -v."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{cmd} failed: {r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return wall, rss


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def run(gb: float, work: Path, repeat: int) -> dict:
    """Median of `repeat` interleaved runs of cp, prune and prune --hash-shards (the page cache makes single runs noisy)."""
    src = work / f"mixtral-{gb:g}gb"
    if not src.exists():
        build(src, gb)
    for d in (work / "cp-out", work / "prune-out"):
        shutil.rmtree(d, ignore_errors=True)
    cmds = {
        "cp": ["cp", "-r", str(src), str(work / "cp-out")],
        "prune": [sys.executable, "-m", "surgery.cli", "prune", str(src), "--plan", str(src / "plan.json"),
                  "-o", str(work / "prune-out")],
    }
    cmds["prune_hash"] = [*cmds["prune"], "--hash-shards"]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, int] = {k: 0 for k in cmds}
    kept, cold = 0.0, False
    for _ in range(repeat):
        for label, cmd in cmds.items():
            cold = drop_caches()
            t, r = timed(cmd)
            times[label].append(t)
            rss[label] = max(rss[label], r)
            if label != "cp":
                kept = du(work / "prune-out") / du(src)
            shutil.rmtree(work / ("cp-out" if label == "cp" else "prune-out"), ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    target = (0.9 * kept + 0.1) * med["cp"]
    out = {"size_gb": du(src) / 1e9, "repeat": repeat, "cold_cache": cold, "kept_fraction": kept, "cp_s": med["cp"],
           "target_s": target, "runs_s": times, "cp_peak_rss_mib": rss["cp"] / 1024}
    for label in ("prune", "prune_hash"):
        out.update({f"{label}_s": med[label], f"{label}_ratio": med[label] / med["cp"],
                    f"{label}_meets_time": med[label] <= target, f"{label}_peak_rss_mib": rss[label] / 1024})
    return out


NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
src, out = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
keep = list(range(6))
for layer in m.model.layers:
    moe = layer.mlp
    moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.data[keep].clone())
    moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.data[keep].clone())
    moe.gate.weight = torch.nn.Parameter(moe.gate.weight.data[keep].clone())
m.config.num_local_experts = len(keep)
m.save_pretrained(out, max_shard_size="200MB")
"""


def naive(work: Path) -> dict:
    """transformers load → slice → save_pretrained on a ~1.5 GB model, beside our prune of the same model."""
    src = work / "mixtral-naive"
    if not src.exists():
        build(src, 1.5, shards=8)
    script = work / "naive.py"
    script.write_text(NAIVE)
    shutil.rmtree(work / "naive-out", ignore_errors=True)
    shutil.rmtree(work / "prune-out", ignore_errors=True)
    drop_caches()
    nv_s, nv_rss = timed([sys.executable, str(script), str(src), str(work / "naive-out")])
    drop_caches()
    pr_s, pr_rss = timed([sys.executable, "-m", "surgery.cli", "prune", str(src), "--plan", str(src / "plan.json"),
                          "-o", str(work / "prune-out")])
    shutil.rmtree(work / "naive-out", ignore_errors=True)
    shutil.rmtree(work / "prune-out", ignore_errors=True)
    return {"size_gb": du(src) / 1e9, "naive_s": nv_s, "naive_peak_rss_mib": nv_rss / 1024,
            "prune_s": pr_s, "prune_peak_rss_mib": pr_rss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, nargs="*", default=[4.0])
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="Runs per command; medians are reported.")
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--keep-inputs", action="store_true", help="Keep the synthetic checkpoints afterwards.")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for gb in args.gb:
        r = run(gb, args.workdir, args.repeat)
        results.append(r)
        print(json.dumps(r), flush=True)
        if not args.keep_inputs:
            shutil.rmtree(args.workdir / f"mixtral-{gb:g}gb", ignore_errors=True)
    if args.naive:
        print(json.dumps(naive(args.workdir)), flush=True)


if __name__ == "__main__":
    main()
