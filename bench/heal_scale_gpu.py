"""Healing at the size users prune, on one GPU (issue 21): `heal --lora 16` against full-parameter `heal`.

Builds bench/memory_gpu.py's random Qwen3-MoE (default: hidden 2048, 24 layers, 64 experts, top-8,
moe_intermediate 768, bf16: 7.5B parameters), removes 25% of every layer's experts with a hand-made
plan (the first 75% kept: what is measured is healing's cost, not the criterion), writes
character-level calibration text, then runs, each step in its own process and with its own time
limit (build, prune and two heals of at most 180 s: under 9 minutes):

  heal --lora 16 --kd-tokens N        heal --kd-tokens N  (full-parameter; may not fit: then the
                                      refusal line or the out-of-memory error is the result)

and prints one JSON line per step: wall s, peak host RSS GiB (ru_maxrss), peak GPU GiB
(torch.cuda.max_memory_allocated), load s, compute s, tokens and tokens/s as `heal` recorded them,
the held-out KL before/after and the memory estimate of surgery.refine.heal.memory.

  python bench/heal_scale_gpu.py --workdir /tmp/hs --out $OUT/heal_scale_gpu.json          # the issue's run
  python bench/heal_scale_gpu.py --tiny --device cpu --workdir /tmp/hs-tiny                 # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from memory_gpu import build, geometry, text  # noqa: E402

STEP_RUNNER = REPO / "bench" / "memory_gpu.py"  # runs one CLI step in its own process (--step-json)


def step(name: str, argv: list[str], record: str, timeout: float) -> dict:
    """One `moe-surgery argv` in its own process, under `timeout` seconds; errors become the result."""
    cmd = [sys.executable, str(STEP_RUNNER), "--step-json", json.dumps({"argv": argv, "record": record})]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = {"step": name, "error": f"did not finish within {timeout:.0f} s"}
    else:
        if proc.returncode:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            oom = next((line for line in lines if "out of memory" in line.lower()), None)
            result = {"step": name, "error": oom or (lines[-1] if lines else "failed")}
        else:
            result = {"step": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    healed = Path(record.partition(":")[2])
    if "error" not in result and (healed / "pruning.json").exists():
        heal = json.loads((healed / "pruning.json").read_text())["heal"]
        kd = [s for s in heal["stages"] if s["stage"] == "distill"]
        if kd:
            result.update(kd_tokens=kd[0]["tokens"], kd_seconds=kd[0]["seconds"],
                          held_out_kl=[kd[0]["held_out_kl_before"], kd[0]["held_out_kl_after"]])
        result["peak_gpu_memory_mib"] = heal.get("peak_gpu_memory_mib")
    print(json.dumps(result), flush=True)
    return result


def estimate(pruned: Path, model: Path, args, lora: int) -> dict:
    """surgery.refine.heal.memory's figure for this run (GiB per term)."""
    import torch

    from surgery.refine.heal.memory import GIB, model_sizes, needed_bytes, snapshot_dtype
    from surgery.refine.heal.pairing import pair

    with pair(pruned, model) as p:
        sizes, copy = model_sizes(p), snapshot_dtype(p, train_all=False)
    need = needed_bytes(sizes, dtype_bytes=2 if args.device.startswith("cuda") else 4, lora=lora, train_all=False,
                        batch_tokens=args.batch_size * args.seq_len, local_tokens=2**18, local=args.local_steps > 0,
                        distill=True, snapshot_bytes=4 if lora else torch.empty((), dtype=copy).element_size())
    return {k: round(v / GIB, 2) for k, v in need.items()}


def plan(g: dict, path: Path) -> Path:
    keep = list(range(g["experts"] - g["experts"] // 4))
    path.write_text(json.dumps({"keep": {str(layer): keep for layer in range(g["layers"])}}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moe-heal-scale"))
    ap.add_argument("--out", type=Path, help="Write every step's figures here as one JSON document.")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="A 4-layer model of hidden size 64 (a CPU run end to end).")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-inter", type=int, default=768)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--kd-tokens", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=0,
                    help="heal --local-steps (default 0: distillation only, to stay within 9 minutes in all).")
    ap.add_argument("--rank", type=int, default=16, help="heal --lora rank.")
    ap.add_argument("--step-timeout", type=float, default=180, help="Seconds each heal may run.")
    ap.add_argument("--steps", default="lora,full")
    args = ap.parse_args()
    if args.tiny:
        args.seq_len, args.kd_tokens, args.batch_size, args.local_steps = 64, 512, 4, min(args.local_steps, 5)
    g = geometry(args)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build(work / ("model-tiny" if args.tiny else f"model-h{g['hidden']}-l{g['layers']}-e{g['experts']}"), g,
                  args.device if args.device.startswith("cuda") else "cpu")
    pruned = work / "pruned-0.25"
    if not (pruned / "pruning.json").exists():
        shutil.rmtree(pruned, ignore_errors=True)
        from surgery.cli import main as cli

        cli(["prune", str(model), "--plan", str(plan(g, work / "plan.json")), "-o", str(pruned)],
            standalone_mode=False)
    held = max(1, args.kd_tokens // args.seq_len // 15) * args.seq_len  # heal holds out one sequence in 16
    data = text(work / "calib.jsonl", args.kd_tokens + held + 4 * args.seq_len)
    print(json.dumps({"built": str(model), "pruned": str(pruned), "seconds": round(time.perf_counter() - t0, 1)}),
          flush=True)
    common = ["-d", str(data), "--device", args.device, "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--kd-tokens", str(args.kd_tokens), "--local-steps", str(args.local_steps),
              "--no-synthesize", "--overwrite"]
    results = {}
    for name in args.steps.split(","):
        lora = args.rank if name == "lora" else 0
        out = work / f"healed-{name}"
        argv = ["heal", str(pruned), "--teacher", str(model), "-o", str(out), *common, *(["--lora", str(lora)] if lora else [])]
        results[name] = {"estimate_gib": estimate(pruned, model, args, lora),
                         **step(f"heal {'--lora %d' % lora if lora else '(full)'}", argv, f"heal:{out}",
                                args.step_timeout)}
        shutil.rmtree(out, ignore_errors=True)  # 15 GB each: the disk holds the model, the student and one output
    if args.out:
        args.out.write_text(json.dumps({"geometry": g, "kd_tokens": args.kd_tokens, "steps": results}, indent=2))


if __name__ == "__main__":
    main()
