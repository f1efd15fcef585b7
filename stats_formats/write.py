"""Writing statistics files: StatsWriter gathers a collect's tensors and saves them as one validated file."""

from __future__ import annotations

from typing import Any

import numpy as np

from stats_formats.atomic import PathLike
from stats_formats.file import StatsFile
from stats_formats.schema import FIELD_BY_NAME, HOLDOUT_FIELDS, field_shape, tensor_name
from stats_formats.validate import NUMPY_DTYPES, VOCAB_KEY, StatsError, check_model

WRITER_LABEL = "<writer>"


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
