"""Rows and summary of a bench/device_mc.sh state folder (issue 24 on the GPU, and issue 22's recipe comparison).

Reads what the steps left in STATE (steps.jsonl, rows/*.jsonl written by bench/mc_quality.py, timing/
lm_eval_gpu.json, the healed checkpoints' pruning.json records, recipe/eval-*.json written by `moe-surgery eval
--json --reference`), writes every row as one JSON line (each with its step) to --rows and prints Markdown
tables: one row per model (perplexity, KL, accuracy, wall seconds), accuracy per domain, timing, heal runs, steps.

  python bench/device_mc_table.py --state /tmp/devmc-even --rows $OUT/rows-even.jsonl > $OUT/summary-even.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEALS = {"healed-0.25": "healed reap 0.25", "healed-0.5": "healed reap 0.5",
         "moe-pruner-0.25": "healed reap 0.25 (moe-pruner)"}
RECIPE = {"removal": "removal reap 0.25", "default": "healed reap 0.25 (default)",
          "moe-pruner": "healed reap 0.25 (moe-pruner)"}


def run_label(name: str) -> str:
    """'lora16-0.5' -> 'reap 0.5, heal --lora 16'; 'full-0.5' -> 'reap 0.5, full heal'; known names as above."""
    if name in HEALS or name in RECIPE:
        return HEALS.get(name) or RECIPE[name]
    kind, _, ratio = name.rpartition("-")
    if kind.startswith("lora"):
        return f"reap {ratio}, heal --lora {kind[4:]}"
    return {"full": f"reap {ratio}, full heal", "removal": f"reap {ratio}, removal"}.get(kind, name)
BIG_KEYS = {"layers", "held_out_kl_checks", "tensors_written", "data", "held_out_error_checks"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def heal_record(folder: Path) -> dict | None:
    """The `heal` record of a healed checkpoint, without its long per-layer and per-check lists."""
    path = folder / "pruning.json"
    if not path.is_file():
        return None
    heal = json.loads(path.read_text()).get("heal") or {}
    out = {k: v for k, v in heal.items() if k not in BIG_KEYS | {"stages"}}
    out["stages"] = [{k: v for k, v in s.items() if k not in BIG_KEYS} for s in heal.get("stages", [])]
    return out


def collect_rows(state: Path) -> list[dict]:
    """Every row the steps wrote, in step order, each tagged with its step."""
    rows = [{"step": "steps", **r} for r in jsonl(state / "steps.jsonl")]
    for step in ("mc", "heal"):
        for path in sorted((state / "rows").glob(f"{step}-*.jsonl")):
            rows += [{"step": step, **r} for r in jsonl(path)]
    timing = state / "timing" / "lm_eval_gpu.json"
    if timing.is_file():
        rows.append({"step": "timing", "model": "unpruned", **json.loads(timing.read_text())})
    walls = {r["run"]: r for r in jsonl(state / "heal-walls.jsonl")}
    for name in dict.fromkeys([*HEALS, *walls]):
        record = heal_record(state / name)
        if record is not None or name in walls:
            rows.append({"step": "heal-record", "model": run_label(name), "wall": walls.get(name), "heal": record})
    for path in sorted((state / "recipe").glob("eval-*.json")):
        if path.is_file():
            result = json.loads(path.read_text())
            rows.append({"step": "eval", "model": run_label(path.stem.removeprefix("eval-")),
                         "geomean_ppl": result.get("geomean_ppl"),
                         "kl": result.get("kl"), "top1": result.get("top1"), "seconds": result.get("wall_seconds"),
                         "ppl": {f["domain"]: f["ppl"] for f in result.get("files", [])},
                         "ppl_tokens_per_file": max((f["tokens"] for f in result.get("files", [])), default=None)})
    return rows


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def model_table(rows: list[dict]) -> str:
    """One line per measured model; Δ against the unpruned row of the mc step when there is one."""
    base = next((r for r in rows if r["step"] == "mc" and r["model"] == "unpruned"), None)
    head = ["step", "model", "geomean ppl", "Δ ppl", "KL", "top-1", "mean acc", "Δ acc", "mean acc_norm",
            "requests", "s / 1k req", "wall s"]
    lines = ["(s / 1k req and wall s of these rows: measured with the other models (and the heals, in a + group) on the GPU "
             "at the same time; the timing table is the clean figure)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["step"] not in ("mc", "heal", "eval"):
            continue
        ppl, acc, timing = r.get("geomean_ppl"), r.get("mean_acc"), r.get("timing") or {}
        other = base is not None and r is not base
        dppl = f"{100 * (ppl / base['geomean_ppl'] - 1):+.1f}%" if other and ppl and base.get("geomean_ppl") else ""
        dacc = f"{acc - base['mean_acc']:+.3f}" if other and acc is not None and "mean_acc" in base else ""
        cells = [r["step"], r["model"], fmt(ppl, ".2f"), dppl, fmt(r.get("kl"), ".3f"), fmt(r.get("top1"), ".3f"),
                 fmt(acc, ".3f"), dacc, fmt(r.get("mean_acc_norm"), ".3f"), fmt(timing.get("requests"), ","),
                 fmt(timing.get("seconds_per_1000_requests"), ".1f"), fmt(r.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_table(rows: list[dict]) -> str:
    measured = [r for r in rows if r.get("acc")]
    if not measured:
        return ""
    tasks = list(measured[0]["acc"])
    head = ["model", "items/domain", *[t.removeprefix("mc_") for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in measured:
        items = sorted(set((r.get("items") or {}).values()))
        lines.append("| " + " | ".join([r["model"], "/".join(map(str, items)),
                                        *[fmt(r["acc"].get(t), ".3f") for t in tasks]]) + " |")
    return "\n".join(lines)


def timing_table(rows: list[dict]) -> str:
    t = next((r for r in rows if r["step"] == "timing"), None)
    if t is None:
        return ""
    head = ["batch", "requests", "request s", "s / 1k req", "tokens/s", "mean acc", "peak GPU MiB"]
    lines = [f"timing: {t['model']} on {t.get('gpu') or t['device']}, {t['dtype']}, limit {t['limit']} items/domain, "
             f"load {t['load_seconds']} s, peak host RSS {t['peak_rss_bytes'] / 2**20:,.0f} MiB", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in t["runs"]:
        gpu = run.get("peak_gpu_bytes")
        lines.append("| " + " | ".join([str(run["batch_size"]), f"{run['requests']:,}", f"{run['request_seconds']:.1f}",
                                        f"{run['seconds_per_1000_requests']:.1f}", f"{run['tokens_per_second']:,.0f}",
                                        f"{run['mean_acc']:.3f}", fmt(gpu and gpu / 2**20, ",.0f")]) + " |")
    return "\n".join(lines)


def heal_table(rows: list[dict]) -> str:
    heals = [r for r in rows if r["step"] == "heal-record"]
    if not heals:
        return ""
    head = ["run", "rc", "wall s", "heal s", "peak GPU MiB", "stages (held-out before → after)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in heals:
        wall, heal = r.get("wall") or {}, r.get("heal") or {}
        stages = "; ".join(stage_note(s) for s in heal.get("stages", []))
        lines.append("| " + " | ".join([r["model"], str(wall.get("rc", "")), fmt(wall.get("seconds"), ".0f"),
                                        str(heal.get("seconds", "")), str(heal.get("peak_gpu_memory_mib", "")),
                                        stages]) + " |")
    return "\n".join(lines)


def stage_note(stage: dict) -> str:
    before = stage.get("held_out_kl_before", stage.get("held_out_loss_before"))
    after = stage.get("held_out_kl_after", stage.get("held_out_loss_after"))
    note = f"{stage.get('stage')} {stage.get('tokens', '')} tok"
    if before is not None and after is not None:
        note += f", {float(before):.3f} → {float(after):.3f}"
    return note + (f", {stage['seconds']} s" if "seconds" in stage else "")


def steps_table(rows: list[dict]) -> str:
    steps = [r for r in rows if r["step"] == "steps"]
    lines = ["| call | step | status | wall s |", "|---|---|---|---|"]
    lines += [f"| {r.get('call', '')} | {r['name']} | {r['status']} | {r['seconds']} |" for r in steps]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--rows", type=Path, help="write every row here as JSON lines")
    args = p.parse_args()
    rows = collect_rows(args.state)
    if args.rows:
        args.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = [model_table(rows), domain_table(rows), timing_table(rows), heal_table(rows), steps_table(rows)]
    print("\n\n".join(x for x in parts if x))


if __name__ == "__main__":
    main()
