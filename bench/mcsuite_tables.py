"""Per-domain Markdown tables of issue 12's MC-Suite study from the JSON lines in bench/results/.

  python bench/mcsuite_tables.py ONE_SHOT.jsonl [...] --rounds ROUNDS.jsonl [...] > table.md

One-shot rows (bench/quality.py) and rounds rows (bench/rounds_quality.py, labelled with their mode) get
one line each: geomean perplexity, Δ, KL, top-1 and every eval domain. A criterion run twice keeps its first row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import markdown  # noqa: E402


def rows_of(paths: list[str], with_mode: bool) -> list[dict]:
    out, seen = [], set()
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            if with_mode and r.get("mode"):
                r = {**r, "criterion": f"{r['criterion']}, {r['mode']}"}
            key = (r["criterion"], r["ratio"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return sorted(out, key=lambda r: (r["ratio"], r["criterion"] != "unpruned"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("one_shot", nargs="*")
    ap.add_argument("--rounds", nargs="*", default=[])
    args = ap.parse_args()
    if args.one_shot:
        print("One-shot:\n\n" + markdown(rows_of(args.one_shot, False)) + "\n")
    if args.rounds:
        print("Schedules:\n\n" + markdown(rows_of(args.rounds, True)) + "\n")


if __name__ == "__main__":
    main()
