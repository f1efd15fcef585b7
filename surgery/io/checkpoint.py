"""A checkpoint folder: config.json plus one or many safetensors shards, never loaded whole."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from surgery.io.safetensors_file import CheckpointError, SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """Lazy view of a Hugging Face checkpoint folder.

    Only files named by the index (or the single `model.safetensors`) are weights; other
    safetensors files in the folder (e.g. `consolidated.safetensors`) are left alone.
    """

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a checkpoint folder (no such directory)")
        cfg_path = self.config_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing; a checkpoint folder needs config.json")
        try:
            self.config: dict = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        self.index: dict | None = None
        index_path = self.dir / INDEX_NAME
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text())
                weight_map = self.index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: corrupt index (no weight_map object)") from None
            self.shard_names: list[str] = sorted(set(weight_map.values()))
            for shard in self.shard_names:
                if not (self.dir / shard).is_file():
                    raise CheckpointError(f"{index_path}: names shard {shard!r}, which is missing")
        elif (self.dir / SINGLE_NAME).is_file():
            self.shard_names = [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX_NAME} or {SINGLE_NAME}")
        self.files: dict[str, SafetensorsFile] = {s: SafetensorsFile(self.dir / s) for s in self.shard_names}
        self.weight_map: dict[str, str] = {}
        for shard, f in self.files.items():
            for name in f.tensors:
                if name in self.weight_map:
                    raise CheckpointError(f"{self.dir / shard}: tensor {name!r} also stored in {self.weight_map[name]}")
                self.weight_map[name] = shard
        if self.index is not None:
            for name, shard in self.index["weight_map"].items():
                if self.weight_map.get(name) != shard:
                    raise CheckpointError(f"{index_path}: maps {name!r} to {shard}, but that shard does not hold it")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.weight_map[name]].tensors[name]

    def file_of(self, name: str) -> SafetensorsFile:
        return self.files[self.weight_map[name]]

    def read_bytes(self, name: str) -> bytes:
        return self.file_of(name).read_bytes(name)

    def array(self, name: str) -> np.ndarray:
        return self.file_of(name).array(name)

    @cached_property
    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
