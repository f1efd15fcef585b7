"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def emit(row: dict, out: Path | None) -> None:
    """Print one result as a JSON line and append it to `out`, so partial runs keep what they measured."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def list_eval_files(path: str) -> list[str]:
    """The eval set: every .jsonl of a folder (one domain each, sorted), or the single file given."""
    p = Path(path)
    return sorted(str(f) for f in p.glob("*.jsonl")) if p.is_dir() else [path]
