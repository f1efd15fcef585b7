"""The per-expert statistics file, one module per job: schema.py (every tensor), validate.py (the checks every
file passes), file.py (StatsFile: reading), write.py (StatsWriter), atomic.py (temp-and-rename writes),
merge.py and export.py (summary, CSV, JSON). Imports numpy, safetensors and the standard library only."""

import importlib
import sys
import types

from stats_formats.atomic import atomic_write, atomic_write_text
from stats_formats.errors import StatsError
from stats_formats.schema import (
    FIELD_BY_NAME,
    FIELDS,
    HOLDOUT_FIELDS,
    METADATA_KEY,
    NONNEGATIVE_FIELDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    Field,
    field_shape,
    tensor_name,
)

# Imported on first use (they import numpy and safetensors): `from stats_formats import StatsFile` works as
# before, and writing a file with stats_formats.atomic (the rewriter's output folders) costs no numpy.
_LAZY = {
    "SUMMARY_COLUMNS": "export", "expert_summary": "export", "summary_table": "export", "to_csv": "export",
    "to_json": "export", "StatsFile": "file", "merge": "merge", "StatsWriter": "write",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`stats_formats.merge` stays the function when the submodule of that name is first imported (the import
    system sets a package attribute per submodule), as when this file imported everything eagerly."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "FIELD_BY_NAME",
    "FIELDS",
    "HOLDOUT_FIELDS",
    "METADATA_KEY",
    "NONNEGATIVE_FIELDS",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SUMMARY_COLUMNS",
    "Field",
    "StatsError",
    "StatsFile",
    "StatsWriter",
    "atomic_write",
    "atomic_write_text",
    "expert_summary",
    "field_shape",
    "merge",
    "summary_table",
    "tensor_name",
    "to_csv",
    "to_json",
]
