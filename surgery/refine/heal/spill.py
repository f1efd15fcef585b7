"""Trained tensors parked on disk as each layer finishes, so that heal's host memory does not grow with the model.

One safetensors file per layer (a "group") in a folder inside the output's temporary folder: removed when
heal ends (`close`), and with the temporary folder if it fails or is killed. Two kinds of file:

* values: a layer's trained float32 parameters under their in-memory names, exactly as trained, for the
  distillation stage to start from (`put_values`, `values`);
* encoded: the layer's tensors as they will be written (surgery.io.requantize.Encoded: bytes, dtype,
  shape, the tensors they take the place of), streamed to the writer one tensor at a time (`read`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from surgery.io.requantize import Encoded

SPILL_DIR = "heal-spill"


class Spill:
    """See the module docstring. `folder` must not exist; it is created here."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder = folder
        self._values: dict[str, Path] = {}
        self._encoded: dict[str, tuple[Path, Encoded]] = {}  # tensor name -> (file, its description, no data)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, kind: str, group: str) -> Path:
        return self.folder / f"{kind}-{group}.safetensors"

    def put_values(self, group: str, values: dict[str, torch.Tensor]) -> None:
        """Park a group's float32 in-memory parameters (replacing that group's earlier values)."""
        path = self._path("values", group)
        save_file({n: v.detach().to("cpu", torch.float32).contiguous() for n, v in values.items()}, path)
        self._values[group] = path

    def value_groups(self) -> list[str]:
        return list(self._values)

    def values(self, group: str) -> dict[str, torch.Tensor]:
        """One group's parked parameters."""
        return load_file(self._path("values", group))

    def drop_values(self, group: str) -> None:
        self._values.pop(group).unlink()

    def put_encoded(self, group: str, tensors: list[Encoded]) -> None:
        """Park a group's tensors as written (bytes as uint8; names, dtypes, shapes in the metadata)."""
        path = self._path("encoded", group)
        meta = {t.name: [t.dtype, list(t.shape), list(t.replaces)] for t in tensors}
        save_numpy({t.name: np.frombuffer(t.data, dtype=np.uint8) for t in tensors}, path,
                   metadata={"tensors": json.dumps(meta)})  # views of the bytes, not copies
        for t in tensors:
            self._encoded[t.name] = (path, Encoded(t.name, t.dtype, t.shape, b"", t.replaces))

    @property
    def encoded(self) -> dict[str, Encoded]:
        """Every parked tensor to write, by name (descriptions only: `read` gives the bytes)."""
        return {name: e for name, (_, e) in self._encoded.items()}

    def read(self, name: str) -> Iterator[bytes]:
        """A parked tensor's bytes, read from its file when asked for."""
        path, _ = self._encoded[name]
        with safe_open(path, framework="pt") as f:
            yield f.get_tensor(name).numpy().tobytes()

    def close(self) -> None:
        self._values.clear()
        self._encoded.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

