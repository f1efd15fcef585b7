"""Markdown table of `moe-surgery eval --json` results (issue 11's heal benchmark).

  python bench/heal_table.py unpruned=eval-unpruned.json removal=eval-reap-0.25.json local=eval-local-student-0.25.json

Each argument is LABEL=FILE; the first is the reference for Δ and for "gap closed" (the share of the
removal row's perplexity increase won back; the removal row is the first one labelled `removal`).
"""

from __future__ import annotations

import json
import sys


def main(args: list[str]) -> None:
    rows = [(label, json.load(open(path))) for label, path in (a.split("=", 1) for a in args)]
    base = rows[0][1]["geomean_ppl"]
    removal = next((r["geomean_ppl"] for label, r in rows if label.startswith("removal")), None)
    domains = [f["domain"] for f in rows[0][1]["files"]]
    print("| variant | " + " | ".join(domains) + " | geomean | Δ | gap closed |")
    print("|---" * (len(domains) + 4) + "|")
    for label, r in rows:
        ppl = {f["domain"]: f["ppl"] for f in r["files"]}
        g = r["geomean_ppl"]
        closed = "" if removal is None or label.startswith(("removal", rows[0][0])) else \
            f"{(removal - g) / (removal - base):.1%}"
        delta = "" if r is rows[0][1] else f"{g / base - 1:+.1%}"
        print(f"| {label} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {g:.2f} | {delta} | {closed} |")


if __name__ == "__main__":
    main(sys.argv[1:])
