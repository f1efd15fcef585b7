"""Quantized checkpoints on one GPU (issue 19): wall time, peak host RSS and peak GPU memory of every command.

(a) gpt-oss-20b geometry in MXFP4 (the published config: 24 layers, 32 experts, top-4, hidden 2880, expert
width 2880, 64 heads of 64, 8 KV heads, vocab 201088), built shard by shard with random codes (numpy random
e2m1 nibbles; e8m0 scales 2^-7..2^-6, so weights are finite, rms 0.02-0.05), then, each in its own process:
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

from bench_common import emit
from memory_gpu import run_step, text  # puts the repository and tests/ on sys.path
from quantized_build import build_deepseek, build_gpt_oss, deepseek_config, gpt_oss_config

A_STEPS = ("collect", "stream", "forward", "prune", "verify", "eval", "heal")
B_STEPS = ("ds-stream", "ds-prune")
DEFAULT_STEPS = ",".join(s for s in A_STEPS + B_STEPS if s != "heal")
DS_FULL = {"dense_layers": 3, "moe_layers": 58, "vocab": 129280}  # DeepSeek-V3 / R1 (MTP layer not counted)


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
            str(args.kd_tokens), "--seq-len", str(args.seq_len), "--device", args.device, *args.heal_args.split()],
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
    ap.add_argument("--heal-args", default="", help='More `heal` options, e.g. "--lora 16 --local-steps 0".')
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
