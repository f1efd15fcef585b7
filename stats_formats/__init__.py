"""The per-expert statistics file, one module per job: schema.py (every tensor), validate.py (the checks every
file passes), file.py (StatsFile: reading), write.py (StatsWriter), atomic.py (temp-and-rename writes),
merge.py and export.py (summary, CSV, JSON). Imports numpy, safetensors and the standard library only."""

from stats_formats.atomic import atomic_write, atomic_write_text
from stats_formats.export import SUMMARY_COLUMNS, expert_summary, summary_table, to_csv, to_json
from stats_formats.file import StatsFile
from stats_formats.merge import merge
from stats_formats.validate import StatsError
from stats_formats.write import StatsWriter
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
