"""A checkpoint folder: config.json plus one or many safetensors shards, never loaded whole."""

from __future__ import annotations

import os
import stat
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.io.paths import member, short_repr, show
from surgery.io.safetensors_file import CheckpointError, SafetensorsFile, TensorInfo, one_line, strict_json

if TYPE_CHECKING:
    import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_JSON = 512 * 1024 * 1024  # config.json or the index: far above any real one


def _read_json(path: Path) -> object:
    """A JSON file of the checkpoint (already checked by `member`), as strictly parsed JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{show(path)}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{show(path)}: not a regular file")
        if st.st_size > MAX_JSON:
            raise CheckpointError(f"{show(path)}: {st.st_size} bytes is implausibly large for a JSON file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_JSON + 1)
    except OSError as e:
        raise CheckpointError(f"{show(path)}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    try:
        return strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{show(path)}: not valid JSON ({one_line(e)[:200]})") from None


class Checkpoint:
    """Lazy view of a Hugging Face checkpoint folder.

    Only files named by the index (or the single `model.safetensors`) are weights; other
    safetensors files in the folder (e.g. `consolidated.safetensors`) are left alone.

    Every file name the folder's own files give (the index's shard names) is checked before it is
    opened: a plain file name or one subfolder level, no `..`, not absolute, and resolving inside
    the folder or into the Hugging Face cache's `blobs/` (see `surgery.io.paths.member`).
    """

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)
        try:
            st = os.stat(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(f"{show(self.dir)}: not a checkpoint folder (no such directory)") from None
        except OSError as e:
            raise CheckpointError(f"{show(self.dir)}: cannot open the checkpoint folder ({e.strerror})") from None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a file" if stat.S_ISREG(st.st_mode) else "not a folder"
            raise CheckpointError(f"{show(self.dir)}: is {kind}, not a checkpoint folder")
        cfg_path = self.config_path = self.dir / "config.json"
        if not os.path.lexists(cfg_path):
            raise CheckpointError(f"{show(cfg_path)}: missing; a checkpoint folder needs config.json")
        member(self.dir, "config.json")
        config = _read_json(cfg_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{show(cfg_path)}: not a JSON object")
        self.config: dict = config
        self.index: dict | None = None
        index_path = self.dir / INDEX_NAME
        if os.path.lexists(index_path):
            member(self.dir, INDEX_NAME)
            index = _read_json(index_path)
            if not isinstance(index, dict):
                raise CheckpointError(f"{show(index_path)}: corrupt index (not a JSON object)")
            if "weight_map" not in index:
                raise CheckpointError(f"{show(index_path)}: corrupt index (no weight_map object)")
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{show(index_path)}: corrupt index (weight_map is not an object)")
            if not weight_map:
                raise CheckpointError(f"{show(index_path)}: corrupt index (weight_map is empty)")
            if not isinstance(index.get("metadata") or {}, dict):
                raise CheckpointError(f"{show(index_path)}: corrupt index (metadata is not an object)")
            for name, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise CheckpointError(
                        f"{show(index_path)}: weight_map value for {short_repr(name)} is not a string")
            self.index = index
            self.shard_names: list[str] = sorted(set(weight_map.values()))
            for shard in self.shard_names:
                member(self.dir, shard, index_path)
        elif os.path.lexists(self.dir / SINGLE_NAME):
            member(self.dir, SINGLE_NAME)
            self.shard_names = [SINGLE_NAME]
        else:
            raise CheckpointError(f"{show(self.dir)}: no {INDEX_NAME} or {SINGLE_NAME}")
        self.files: dict[str, SafetensorsFile] = {}
        try:
            for s in self.shard_names:
                self.files[s] = SafetensorsFile(self.dir / s)
        except BaseException:
            self.close()
            raise
        self.weight_map: dict[str, str] = {}
        for shard, f in self.files.items():
            for name in f.tensors:
                if name in self.weight_map:
                    self.close()
                    raise CheckpointError(f"{show(self.dir / shard)}: tensor {short_repr(name)} also stored in "
                                          f"{short_repr(self.weight_map[name])}")
                self.weight_map[name] = shard
        if self.index is not None:
            for name, shard in self.index["weight_map"].items():
                if self.weight_map.get(name) != shard:
                    self.close()
                    raise CheckpointError(f"{show(index_path)}: maps {short_repr(name)} to {short_repr(shard)}, "
                                          "but that shard does not hold it")

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

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
