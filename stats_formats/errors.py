"""The format's one exception and its message helper (standard library only, so writing a file with
stats_formats.atomic never imports numpy)."""

from __future__ import annotations


class StatsError(Exception):
    """Invalid statistics: the message is one line starting with the file (or in-memory label)."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())
