"""Validation shared by every way a statistics file comes to be: metadata document, then tensors.

Files read from disk, built by a writer and produced by a merge all pass these checks, so scoring
code can trust whatever it is handed. Every failure is a StatsError whose message is one line
starting with the file (or in-memory label).
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any, Mapping, Protocol

import numpy as np

from stats_formats.errors import StatsError, one_line  # noqa: F401 - re-exported
from stats_formats.schema import (
    FIELD_BY_NAME,
    FIELDS,
    HOLDOUT_FIELDS,
    METADATA_KEY,
    NONNEGATIVE_FIELDS,
    OPTIONAL_GROUPS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    field_shape,
    tensor_name,
)


def tool_version() -> str:
    """The installed moe-surgery version, read from package metadata: the format never imports the tool."""
    try:
        return importlib.metadata.version("moe-surgery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SUPPORTED_MAJOR = int(SCHEMA_VERSION.split(".")[0])

# Required metadata keys and their JSON types; newer minor versions may add keys, which are ignored.
_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "num_hidden_layers": (int,),
    "num_experts": (int,),
    "hidden_size": (int,),
    "intermediate_size": (int,),
    "top_k": (int,),
    "moe_layers": (list,),
    "config_sha256": (str,),
    "router_sha256": (str,),
}
_CALIBRATION_KEYS: dict[str, tuple[type, ...]] = {
    "sources": (list,),
    "num_sequences": (int,),
    "num_tokens": (int,),
    "seq_len": (int,),
    "seed": (int, type(None)),
    "holdout_sequences": (int,),
}
# Optional calibration keys and their values: how sequences were cut (`collect --sampling`; "mixed" after
# merging files that differ) and which gradient statistics the file holds (`collect --gradients`).
OPTIONAL_CALIBRATION: dict[str, tuple[str, ...]] = {
    "sampling": ("packed", "documents", "mixed"),
    "gradients": ("per-sequence", "accumulated"),
}
_POSITIVE_MODEL_KEYS = ("num_hidden_layers", "num_experts", "hidden_size", "intermediate_size", "top_k")
VOCAB_KEY = "vocab_size"  # optional model key: the shape of `token_bits`, which needs it
NUMPY_DTYPES = {"F64": np.float64, "U8": np.uint8}  # Field.dtype -> array dtype
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", type(None): "null"}


class TensorSource(Protocol):
    """What validation reads: tensor names, (dtype, shape) per name, and the values."""

    names: frozenset[str]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]: ...

    def read(self, name: str) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Metadata validation


def _check_section(label: str, section: str, data: object, spec: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """Required keys with the right JSON type (bool is not an integer, although Python says so)."""
    if not isinstance(data, dict):
        raise StatsError(f"{label}: metadata '{section}' is missing or not an object")
    for key, types in spec.items():
        if key not in data:
            raise StatsError(f"{label}: metadata {section}.{key} is missing")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise StatsError(f"{label}: metadata {section}.{key} is {value!r}, expected {expected}")
    return data


def check_model(label: str, model: object) -> None:
    """The model identity must be complete: its dimensions fix every tensor's shape."""
    model = _check_section(label, "model", model, _MODEL_KEYS)
    for key in _POSITIVE_MODEL_KEYS:
        if model[key] < 1:
            raise StatsError(f"{label}: metadata model.{key} is {model[key]}, expected a positive integer")
    vocab = model.get(VOCAB_KEY, 1)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise StatsError(f"{label}: metadata model.{VOCAB_KEY} is {vocab!r}, expected a positive integer")
    layers = model["moe_layers"]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in layers):
        raise StatsError(f"{label}: metadata model.moe_layers must hold non-negative integers, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise StatsError(f"{label}: metadata model.moe_layers lists a layer twice: {layers!r}")


def check_calibration(label: str, calibration: object) -> None:
    """Counts must be non-negative integers so that merged files can add them."""
    calibration = _check_section(label, "calibration", calibration, _CALIBRATION_KEYS)
    if not all(isinstance(s, str) for s in calibration["sources"]):
        raise StatsError(f"{label}: metadata calibration.sources must be a list of strings")
    for key in ("num_sequences", "num_tokens", "seq_len", "holdout_sequences"):
        if calibration[key] < 0:
            raise StatsError(f"{label}: metadata calibration.{key} is {calibration[key]}, expected >= 0")
    for key, allowed in OPTIONAL_CALIBRATION.items():  # absent in files from before the key
        if key in calibration and calibration[key] not in allowed:
            raise StatsError(f"{label}: metadata calibration.{key} is {calibration[key]!r}, expected one of "
                             f"{', '.join(allowed)}")


def _major_version(label: str, version: object) -> int:
    parts = version.split(".") if isinstance(version, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise StatsError(f"{label}: format version {version!r} is not of the form 'MAJOR.MINOR'")
    return int(parts[0])


def parse_metadata(label: str, header: Mapping[str, str] | None) -> dict[str, Any]:
    """Decode and check the JSON document; unknown keys (from a newer minor version) are kept."""
    raw = (header or {}).get(METADATA_KEY)
    if raw is None:
        raise StatsError(f"{label}: no '{METADATA_KEY}' metadata in the header; not a moe-surgery statistics file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StatsError(f"{label}: '{METADATA_KEY}' metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise StatsError(f"{label}: '{METADATA_KEY}' metadata is not a JSON object")
    if meta.get("schema") != SCHEMA_NAME:
        raise StatsError(f"{label}: schema is {meta.get('schema')!r}, expected {SCHEMA_NAME!r}")
    version = meta.get("version")
    if _major_version(label, version) != SUPPORTED_MAJOR:
        raise StatsError(
            f"{label}: format version {version} is not supported; "
            f"this reader (moe-surgery {tool_version()}) reads versions {SUPPORTED_MAJOR}.x"
        )
    check_model(label, meta.get("model"))
    check_calibration(label, meta.get("calibration"))
    for key in ("tool_version", "created"):
        if not isinstance(meta.get(key), str):
            raise StatsError(f"{label}: metadata {key} is missing or not a string")
    return meta


# ---------------------------------------------------------------------------------------------
# Tensor validation


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_values(label: str, name: str, values: np.ndarray, nonnegative: bool) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        idx = _first_index(bad)
        v = values[idx]
        kind = "NaN" if np.isnan(v) else ("Inf" if v > 0 else "-Inf")
        raise StatsError(f"{label}: tensor {name} contains {kind} at {list(idx)}")
    if nonnegative and (values < 0).any():
        idx = _first_index(values < 0)
        raise StatsError(
            f"{label}: tensor {name} has negative value {float(values[idx])!r} at {list(idx)}; "
            "it is a sum of non-negative terms"
        )


def _check_tensor(label: str, source: TensorSource, name: str, expected: tuple[int, ...], nonnegative: bool,
                  expected_dtype: str = "F64") -> None:
    if name not in source.names:
        raise StatsError(f"{label}: tensor {name} is missing")
    dtype, shape = source.info(name)
    if dtype != expected_dtype:
        raise StatsError(f"{label}: tensor {name} has dtype {dtype}, expected {expected_dtype}")
    if tuple(shape) != expected:
        raise StatsError(f"{label}: tensor {name} has shape {list(shape)}, expected {list(expected)}")
    _check_values(label, name, source.read(name), nonnegative)


def validate_tensors(label: str, source: TensorSource, model: dict[str, Any]) -> bool:
    """Check every required tensor; returns whether the (all-or-nothing) holdout slice is present."""
    dims = (model["num_experts"], model["hidden_size"], model["intermediate_size"])
    layers = model["moe_layers"]
    for layer in layers:
        for field in FIELDS:
            shape = field_shape(field.name, *dims)
            _check_tensor(label, source, tensor_name(layer, field.name), shape, field.name in NONNEGATIVE_FIELDS)
    holdout = [(layer, f) for layer in layers for f in HOLDOUT_FIELDS]
    present = [tensor_name(layer, f, True) for layer, f in holdout if tensor_name(layer, f, True) in source.names]
    if not present:
        return False
    for layer, f in holdout:
        name = tensor_name(layer, f, True)
        if name not in source.names:
            raise StatsError(f"{label}: holdout tensors are incomplete: {present[0]} is present but {name} is missing")
        _check_tensor(label, source, name, field_shape(f, *dims), f in NONNEGATIVE_FIELDS)
    return True


def validate_optional(label: str, source: TensorSource, model: dict[str, Any]) -> tuple[str, ...]:
    """The optional fields the file holds (see schema.OPTIONAL_GROUPS): each group all or nothing."""
    dims = (model["num_experts"], model["hidden_size"], model["intermediate_size"], model.get(VOCAB_KEY, 0))
    found: list[str] = []
    for option, group in OPTIONAL_GROUPS.items():
        names = [(tensor_name(layer, f.name), f.name) for layer in model["moe_layers"] for f in group]
        present = [name for name, _ in names if name in source.names]
        if not present:
            continue
        for name, field in names:
            if name not in source.names:
                raise StatsError(f"{label}: {option or 'MC-Suite'} tensors are incomplete: {present[0]} is present "
                                 f"but {name} is missing")
            if field == "token_bits" and VOCAB_KEY not in model:
                raise StatsError(f"{label}: tensor {name} needs metadata model.{VOCAB_KEY}")
            _check_tensor(label, source, name, field_shape(field, *dims), field in NONNEGATIVE_FIELDS,
                          FIELD_BY_NAME[field].dtype)
        found += [f.name for f in group]
    return tuple(found)
