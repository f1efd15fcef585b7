"""Issue 23's matrix as one Markdown table per fixture, from bench/merge_quality.py's JSON lines.

Rows: each variant (drop, novices, lsq, hc-smoe, mc-smoe, auto; each without and with the refit); columns: Δ
perplexity against the unpruned model for each criterion at each ratio (hc-smoe, mc-smoe and auto choose their
own groups or criterion: one value per ratio, under the first column; auto's winner is named).

  python bench/merge_matrix_table.py bench/results/merge-23-matrix/even-*.jsonl
"""

from __future__ import annotations

import json
import sys

CRITERIA = ("recon", "gated_sq", "mone")
VARIANTS = ("drop", "novices", "lsq", "mc-smoe", "hc-smoe", "auto")


def load(paths: list[str]) -> dict[tuple[str, str, float], dict]:
    """(criterion, variant, ratio) -> row; the unpruned rows are dropped (every file repeats one)."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r["criterion"] != "unpruned":
                    rows[(r["criterion"], r["variant"], r["ratio"])] = r
    return rows


def cell(row: dict | None) -> str:
    if row is None:
        return "–"
    winner = (row.get("auto") or {}).get("winner")
    return f"{row['delta']:+.1%}" + (f" ({winner})" if winner else "")


def table(rows: dict[tuple[str, str, float], dict]) -> str:
    ratios = sorted({r for _, _, r in rows})
    head = [f"{c} {r:.0%}" for r in ratios for c in CRITERIA]
    lines = ["| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for base in VARIANTS:
        for variant in (base, f"{base}+refit"):
            cells = []
            for r in ratios:
                for c in CRITERIA:
                    key_c = "auto" if base == "auto" else c
                    single = base in ("hc-smoe", "mc-smoe", "auto")
                    cells.append(cell(rows.get((key_c, variant, r))) if not single or c == CRITERIA[0] else "")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(load(sys.argv[1:])))
