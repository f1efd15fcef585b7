"""Markdown table of bench/rounds_quality.py JSON lines (issue 12's estimate → prune → heal study).

  python bench/mcsuite_rounds_table.py rounds.jsonl [more.jsonl ...]

One row per criterion and ratio, one column group per mode (one-shot, rounds N, rounds N + heal):
geomean perplexity, KL and wall seconds; the unpruned geomean heads the table.
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    base = next(r for r in rows if r["criterion"] == "unpruned")
    runs = [r for r in rows if r["criterion"] != "unpruned"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    print(f"unpruned geomean perplexity: {base['geomean_ppl']:.2f}\n")
    head = ["criterion", "removed"] + [f"{m}: {k}" for m in modes for k in ("ppl", "KL", "s")]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    keys = list(dict.fromkeys((r["criterion"], r["ratio"]) for r in runs))
    for crit, ratio in sorted(keys, key=lambda k: (k[1], k[0])):
        cells = [crit, f"{ratio:.0%}"]
        for m in modes:
            r = next((r for r in runs if (r["criterion"], r["ratio"], r["mode"]) == (crit, ratio, m)), None)
            cells += [f"{r['geomean_ppl']:.2f}", f"{r['kl']:.3f}", f"{r['seconds']:.0f}"] if r else ["–"] * 3
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
