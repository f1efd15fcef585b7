"""The layer-local stage of a healed checkpoint, one line per layer (issue 21's "did the fit do anything"):
held-out error before/after, the step the best state was reached at (0 = the starting state kept), and the
first/last training loss (equal when no gradient reached the weights).

  python bench/heal_layers.py HEALED/pruning.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def layers(record: dict) -> list[dict]:
    """Per-layer figures of every local stage in a pruning.json heal record."""
    rows = []
    for stage in record["heal"]["stages"]:
        if stage["stage"] != "local":
            continue
        for layer, r in stage["layers"].items():
            rows.append({"layer": int(layer), "before": r["held_out_error_before"], "after": r["held_out_error_after"],
                         "best_step": r["best_step"], "first_loss": r["first_loss"], "last_loss": r["last_loss"],
                         "steps": r["steps"], "tokens": r["tokens"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = layers(json.loads(args.record.read_text()))
    for r in rows:
        print(f"layer {r['layer']:3d}: held-out {r['before']:.4f} -> {r['after']:.4f}  best step {r['best_step']}"
              f"  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}  ({r['steps']} steps, {r['tokens']} tokens)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
