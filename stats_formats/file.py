"""Reading statistics files: StatsFile, on disk or in memory (the tensors are defined in schema.py).

A statistics file is a safetensors container of float64 tensors named `layers.{l}.{field}`, described
by a JSON document under `__metadata__[METADATA_KEY]`. Files read from disk, built by a writer
(write.py) and produced by a merge (merge.py) all pass the same validation (validate.py), so scoring
code can trust whatever it is handed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save, save_file

from stats_formats.atomic import PathLike, atomic_write
from stats_formats.schema import FIELDS, HOLDOUT_FIELDS, METADATA_KEY, SCHEMA_NAME, SCHEMA_VERSION, tensor_name
from stats_formats.validate import (
    StatsError,
    one_line,
    parse_metadata,
    tool_version,
    validate_optional,
    validate_tensors,
)

MEMORY_LABEL = "<memory>"


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
            raise StatsError(f"{path}: not a valid safetensors file ({one_line(e)})") from e
        except OSError as e:
            raise StatsError(f"{path}: cannot read ({one_line(e.strerror or e)})") from e
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
        self.metadata: dict[str, Any] = parse_metadata(label, source.header)
        self.has_holdout = validate_tensors(label, source, self.model)
        self.optional_fields = validate_optional(label, source, self.model)
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
