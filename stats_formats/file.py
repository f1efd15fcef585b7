"""Reading, writing, merging and exporting statistics files (the tensors are defined in schema.py).

A statistics file is a safetensors container of float64 tensors named `layers.{l}.{field}`, described
by a JSON document under `__metadata__[METADATA_KEY]`. Files read from disk, built by a writer and
produced by a merge all pass the same validation, so scoring code can trust whatever it is handed.
"""

from __future__ import annotations

import importlib.metadata

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save, save_file


def tool_version() -> str:
    """The installed moe-surgery version, read from package metadata: the format never imports the tool."""
    try:
        return importlib.metadata.version("moe-surgery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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

PathLike = str | os.PathLike[str]

SUPPORTED_MAJOR = int(SCHEMA_VERSION.split(".")[0])
MEMORY_LABEL = "<memory>"
WRITER_LABEL = "<writer>"
MERGED_LABEL = "<merged>"

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
_POSITIVE_MODEL_KEYS = ("num_hidden_layers", "num_experts", "hidden_size", "intermediate_size", "top_k")
VOCAB_KEY = "vocab_size"  # optional model key: the shape of `token_bits`, which needs it
NUMPY_DTYPES = {"F64": np.float64, "U8": np.uint8}  # Field.dtype -> array dtype
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", type(None): "null"}

SUMMARY_COLUMNS = (
    "layer", "expert", "count", "count_share", "mean_gate", "mean_out_norm", "mean_sq_out_norm",
    "reap", "prob_sum", "out_norm_max", "inter_norm_mean",
)


class StatsError(Exception):
    """Invalid statistics: the message is one line starting with the file (or in-memory label)."""


# ---------------------------------------------------------------------------------------------
# Metadata validation


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


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


def _major_version(label: str, version: object) -> int:
    parts = version.split(".") if isinstance(version, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise StatsError(f"{label}: format version {version!r} is not of the form 'MAJOR.MINOR'")
    return int(parts[0])


def _parse_metadata(label: str, header: Mapping[str, str] | None) -> dict[str, Any]:
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
# Tensor sources: an open safetensors file, or arrays in memory


def _dtype_name(dtype: np.dtype) -> str:
    """The safetensors spelling (F64, F32, I64...) so messages read the same for files and arrays."""
    return f"{dtype.kind.upper()}{dtype.itemsize * 8}"


class _FileSource:
    """Tensors of a safetensors file, read one at a time through the open handle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="numpy")
        except SafetensorError as e:
            raise StatsError(f"{path}: not a valid safetensors file ({_one_line(e)})") from e
        except OSError as e:
            raise StatsError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from e
        self.names = frozenset(self._handle.keys())
        self.header = self._handle.metadata()

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._handle.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle.get_tensor(name)

    def all_tensors(self) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in sorted(self.names)}

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


class _MemorySource:
    """Arrays held in memory, handed out read-only so callers cannot alter validated data."""

    def __init__(self, tensors: Mapping[str, np.ndarray], header: dict[str, str]) -> None:
        self._tensors = dict(tensors)
        self.names = frozenset(self._tensors)
        self.header = header

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        array = self._tensors[name]
        return _dtype_name(array.dtype), array.shape

    def read(self, name: str) -> np.ndarray:
        view = self._tensors[name].view()
        view.flags.writeable = False
        return view

    def all_tensors(self) -> dict[str, np.ndarray]:
        return self._tensors

    def sha256(self) -> str:
        """Hash of the exact bytes `save` would write (safetensors serialisation is deterministic)."""
        return hashlib.sha256(save(self._tensors, metadata=self.header)).hexdigest()


_Source = _FileSource | _MemorySource


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


def _check_tensor(label: str, source: _Source, name: str, expected: tuple[int, ...], nonnegative: bool,
                  expected_dtype: str = "F64") -> None:
    if name not in source.names:
        raise StatsError(f"{label}: tensor {name} is missing")
    dtype, shape = source.info(name)
    if dtype != expected_dtype:
        raise StatsError(f"{label}: tensor {name} has dtype {dtype}, expected {expected_dtype}")
    if tuple(shape) != expected:
        raise StatsError(f"{label}: tensor {name} has shape {list(shape)}, expected {list(expected)}")
    _check_values(label, name, source.read(name), nonnegative)


def _validate_tensors(label: str, source: _Source, model: dict[str, Any]) -> bool:
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


def _validate_optional(label: str, source: _Source, model: dict[str, Any]) -> tuple[str, ...]:
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


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder then rename, so readers never see half a file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StatsError(f"{path}: cannot write ({_one_line(e.strerror or e)})") from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StatsError(f"{path}: cannot write ({_one_line(e.strerror or e)})") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Exports go through the same temp-and-rename path as statistics files."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatsFile:
    """Validated statistics, on disk or in memory; tensors are read only when asked for."""

    def __init__(self, path: PathLike) -> None:
        path = Path(path)
        if not path.exists():
            raise StatsError(f"{path}: no such file")
        if path.is_dir():
            raise StatsError(f"{path}: is a directory, expected a statistics file")
        self._init(_FileSource(path), str(path), path)

    @classmethod
    def from_arrays(
        cls,
        model: dict[str, Any],
        calibration: dict[str, Any],
        tensors: Mapping[str, Any],
        label: str = MEMORY_LABEL,
    ) -> StatsFile:
        """Statistics computed in memory (a writer's or a merge's), checked exactly like a file on disk."""
        meta = {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "model": model,
            "calibration": calibration,
            "tool_version": tool_version(),
            "created": _now(),
        }
        arrays = {name: np.asarray(value) for name, value in tensors.items()}
        source = _MemorySource(arrays, {METADATA_KEY: json.dumps(meta)})
        stats = cls.__new__(cls)
        stats._init(source, label, None)
        return stats

    def _init(self, source: _Source, label: str, path: Path | None) -> None:
        self._source = source
        self.label = label
        self.path = path
        self.metadata: dict[str, Any] = _parse_metadata(label, source.header)
        self.has_holdout = _validate_tensors(label, source, self.model)
        self.optional_fields = _validate_optional(label, source, self.model)
        self._sha256: str | None = None

    @property
    def model(self) -> dict[str, Any]:
        return self.metadata["model"]

    @property
    def calibration(self) -> dict[str, Any]:
        return self.metadata["calibration"]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def layers(self) -> list[int]:
        return list(self.model["moe_layers"])

    @property
    def num_experts(self) -> int:
        return self.model["num_experts"]

    @property
    def sha256(self) -> str:
        """Hash of the file bytes, for provenance in pruning reports; computed on first use."""
        if self._sha256 is None:
            self._sha256 = self._source.sha256()
        return self._sha256

    def get(self, layer: int, field: str, holdout: bool = False) -> np.ndarray:
        if layer not in self.model["moe_layers"]:
            raise StatsError(f"{self.label}: no statistics for layer {layer} (file has layers {self.layers})")
        if holdout and not self.has_holdout:
            raise StatsError(f"{self.label}: no holdout statistics in this file")
        name = tensor_name(layer, field, holdout)
        if name not in self._source.names:
            raise StatsError(f"{self.label}: no tensor {name}")
        return self._source.read(name)

    def layer(self, layer: int, holdout: bool = False) -> dict[str, np.ndarray]:
        fields = HOLDOUT_FIELDS if holdout else tuple(f.name for f in FIELDS) + self.optional_fields
        return {f: self.get(layer, f, holdout) for f in fields}

    def save(self, path: PathLike) -> None:
        """Write atomically, keeping the metadata and any tensors unknown to this version as they are."""
        tensors = self._source.all_tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self._source.header))


class StatsWriter:
    """Collects tensors during calibration and writes them as one validated statistics file."""

    def __init__(self, model: dict[str, Any], calibration: dict[str, Any]) -> None:
        check_model(WRITER_LABEL, model)
        self.model = model
        self.calibration = calibration
        self._tensors: dict[str, np.ndarray] = {}

    def add(self, layer: int, field: str, array: Any, holdout: bool = False) -> None:
        """Store one tensor in its field's dtype (float64 but for bit sets), rejecting names and shapes the
        schema does not allow."""
        if field not in FIELD_BY_NAME:
            raise StatsError(f"{WRITER_LABEL}: unknown field {field!r}")
        if holdout and field not in HOLDOUT_FIELDS:
            raise StatsError(f"{WRITER_LABEL}: field {field} has no holdout slice (only {list(HOLDOUT_FIELDS)})")
        if layer not in self.model["moe_layers"]:
            raise StatsError(f"{WRITER_LABEL}: layer {layer} is not an MoE layer {self.model['moe_layers']}")
        name = tensor_name(layer, field, holdout)
        if name in self._tensors:
            raise StatsError(f"{WRITER_LABEL}: tensor {name} was added twice")
        values = np.array(array, dtype=NUMPY_DTYPES[FIELD_BY_NAME[field].dtype])
        m = self.model
        expected = field_shape(field, m["num_experts"], m["hidden_size"], m["intermediate_size"], m.get(VOCAB_KEY, 0))
        if values.shape != expected:
            raise StatsError(f"{WRITER_LABEL}: tensor {name} has shape {list(values.shape)}, expected {list(expected)}")
        self._tensors[name] = values

    def build(self, label: str = WRITER_LABEL) -> StatsFile:
        """Validate completeness (every field of every layer; holdout all or nothing) in memory."""
        return StatsFile.from_arrays(self.model, self.calibration, self._tensors, label)

    def save(self, path: PathLike) -> StatsFile:
        """Validate, then write atomically; an incomplete writer leaves no file behind."""
        stats = self.build(str(path))
        stats.save(path)
        return stats


# ---------------------------------------------------------------------------------------------
# Merging


def _check_same_model(first: StatsFile, other: StatsFile) -> None:
    """Every key equal; a vocab_size only one side has is fine (the other predates token_bits, which is dropped)."""
    a, b = first.model, other.model
    for key in list(a) + [k for k in b if k not in a]:
        if key == VOCAB_KEY and (key not in a or key not in b):
            continue
        if a.get(key) != b.get(key):
            raise StatsError(
                f"{other.label}: model.{key} is {b.get(key)!r} but {first.label} has {a.get(key)!r}; "
                "statistics of different models cannot be merged"
            )


def _merge_calibration(calibrations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sources are concatenated as given: the same source listed twice was sampled twice."""
    seq_lens = {c["seq_len"] for c in calibrations}
    seeds = {c["seed"] for c in calibrations}
    return {
        "sources": [s for c in calibrations for s in c["sources"]],
        "num_sequences": sum(c["num_sequences"] for c in calibrations),
        "num_tokens": sum(c["num_tokens"] for c in calibrations),
        "seq_len": max(seq_lens),
        "seed": seeds.pop() if len(seeds) == 1 else None,
        "holdout_sequences": sum(c["holdout_sequences"] for c in calibrations),
    }


def _combine(stats: Sequence[StatsFile], layer: int, field: str, how: str, holdout: bool) -> np.ndarray:
    """Accumulate one tensor across files, holding a single extra copy at a time."""
    total = np.array(stats[0].get(layer, field, holdout), dtype=NUMPY_DTYPES[FIELD_BY_NAME[field].dtype])
    op = {"max": np.maximum, "or": np.bitwise_or}.get(how, np.add)
    for s in stats[1:]:
        op(total, s.get(layer, field, holdout), out=total)
    return total


def merge(files: Sequence[StatsFile | PathLike], label: str = MERGED_LABEL) -> StatsFile:
    """Statistics of disjoint token sets combined exactly: sums add, maxima take the maximum.

    Files of another major version are refused when opened; the holdout slice and optional fields
    (`collect --gradients`, the MC-Suite fields) are kept only when every input has them. The result
    lives in memory; call `.save(path)` to write it.
    """
    if not files:
        raise ValueError("merge needs at least one statistics file")
    stats = [f if isinstance(f, StatsFile) else StatsFile(f) for f in files]
    for other in stats[1:]:
        _check_same_model(stats[0], other)
    holdout = all(s.has_holdout for s in stats)
    optional = [n for n in stats[0].optional_fields if all(n in s.optional_fields for s in stats[1:])]
    tensors: dict[str, np.ndarray] = {}
    for layer in stats[0].layers:
        for field in (*FIELDS, *(FIELD_BY_NAME[n] for n in optional)):
            tensors[tensor_name(layer, field.name)] = _combine(stats, layer, field.name, field.merge, False)
        for name in HOLDOUT_FIELDS if holdout else ():
            how = FIELD_BY_NAME[name].merge
            tensors[tensor_name(layer, name, True)] = _combine(stats, layer, name, how, True)
    calibration = _merge_calibration([s.calibration for s in stats])
    return StatsFile.from_arrays(dict(stats[0].model), calibration, tensors, label)


# ---------------------------------------------------------------------------------------------
# Exports


def _ratio(num: float, den: float) -> float | None:
    """A mean over zero tokens is undefined, not zero: exports show it as null / empty."""
    return float(num / den) if den > 0 else None


def expert_summary(stats: StatsFile, layer: int) -> list[dict[str, int | float | None]]:
    """Per-expert means over the tokens routed to each expert (columns SUMMARY_COLUMNS)."""
    count = stats.get(layer, "count")
    moment = stats.get(layer, "moment_g")
    prob_sum = stats.get(layer, "prob_sum")
    norm_max = stats.get(layer, "out_norm_max")
    inter = stats.get(layer, "inter_norm_sum")
    total = float(count.sum())
    rows = []
    for i in range(stats.num_experts):
        n = float(count[i])
        rows.append({
            "layer": layer,
            "expert": i,
            "count": n,
            "count_share": _ratio(n, total),
            "mean_gate": _ratio(moment[1, 0, i], n),
            "mean_out_norm": _ratio(moment[0, 1, i], n),
            "mean_sq_out_norm": _ratio(moment[0, 2, i], n),
            "reap": _ratio(moment[1, 1, i], n),
            "prob_sum": float(prob_sum[i]),
            "out_norm_max": float(norm_max[i]),
            "inter_norm_mean": _ratio(inter[i], n),
        })
    return rows


def to_json(stats: StatsFile) -> str:
    """Everything in one JSON document: metadata, per-expert summary and every tensor as nested lists."""
    layers = []
    for layer in stats.layers:
        entry: dict[str, Any] = {
            "layer": layer,
            "experts": expert_summary(stats, layer),
            "tensors": {name: values.tolist() for name, values in stats.layer(layer).items()},
        }
        if stats.has_holdout:
            entry["holdout"] = {name: values.tolist() for name, values in stats.layer(layer, True).items()}
        layers.append(entry)
    return json.dumps({"metadata": stats.metadata, "sha256": stats.sha256, "layers": layers})


def _csv_value(value: int | float | None) -> str:
    """Exact round-trip text; integral values without a trailing '.0'; undefined means as empty cells."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def to_csv(stats: StatsFile) -> str:
    """One row per (layer, expert) with the summary columns, for spreadsheets and pandas."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for layer in stats.layers:
        for row in expert_summary(stats, layer):
            writer.writerow([_csv_value(row[c]) for c in SUMMARY_COLUMNS])
    return out.getvalue()


_TABLE_COLUMNS = (("layer", 5), ("tokens", 10), ("min share", 9), ("max share", 9),
                  ("mean gate", 9), ("mean norm", 9), ("dead", 4))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_row(cells: Sequence[str]) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, _TABLE_COLUMNS))


def _layer_row(stats: StatsFile, layer: int) -> str:
    """Shares are of all routings in the layer; gate and norm are means over routed tokens."""
    count = stats.get(layer, "count")
    moment = stats.get(layer, "moment_g")
    total = float(count.sum())
    shares = count / total if total > 0 else None
    return _table_row((
        str(layer),
        str(int(stats.get(layer, "tokens")[0])),
        _fmt(None if shares is None else float(shares.min()), ".4f"),
        _fmt(None if shares is None else float(shares.max()), ".4f"),
        _fmt(_ratio(moment[1, 0].sum(), total), ".4g"),
        _fmt(_ratio(moment[0, 1].sum(), total), ".4g"),
        str(int((count == 0).sum())),
    ))


def summary_table(stats: StatsFile) -> str:
    """What `moe-surgery stats show` prints: provenance, then one line per MoE layer."""
    m, c = stats.model, stats.calibration
    holdout = "present" if stats.has_holdout else "absent"
    lines = [
        f"{stats.label}: {SCHEMA_NAME} {stats.version}, sha256 {stats.sha256}",
        f"created {stats.metadata['created']} by moe-surgery {stats.metadata['tool_version']}",
        f"model: {m['model_type']}, {len(stats.layers)} MoE layers of {m['num_hidden_layers']}, "
        f"{m['num_experts']} experts (top-{m['top_k']}), hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}",
        f"config sha256 {m['config_sha256']}, router sha256 {m['router_sha256']}",
        f"calibration: {c['num_sequences']} sequences, {c['num_tokens']} tokens, seq_len {c['seq_len']}, "
        f"seed {c['seed']}, holdout {c['holdout_sequences']} sequences (tensors {holdout})",
        f"sources: {', '.join(c['sources']) or '-'}",
        "",
        _table_row([name for name, _ in _TABLE_COLUMNS]),
    ]
    lines += [_layer_row(stats, layer) for layer in stats.layers]
    return "\n".join(lines)
