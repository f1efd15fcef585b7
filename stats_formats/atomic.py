"""Atomic writes: a temporary file in the target folder, renamed over the target once complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from stats_formats.validate import StatsError, one_line

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder then rename, so readers never see half a file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StatsError(f"{path}: cannot write ({one_line(e.strerror or e)})") from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StatsError(f"{path}: cannot write ({one_line(e.strerror or e)})") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Exports go through the same temp-and-rename path as statistics files."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
