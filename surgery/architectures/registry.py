"""The supported model_types: one ArchSpec per data file in `data/` (format: loader.py)."""

from __future__ import annotations

from surgery.architectures.loader import load_specs
from surgery.architectures.spec import ArchSpec, Prefix

SPECS: dict[str, ArchSpec] = load_specs()

__all__ = ["SPECS", "ArchSpec", "Prefix", "get_spec", "supported"]


def supported() -> list[str]:
    return sorted(SPECS)


def get_spec(model_type: str) -> ArchSpec | None:
    return SPECS.get(model_type)
