"""The one writer of derived checkpoints: a new folder made from a source checkpoint, written atomically.

    with DerivedCheckpoint(out_dir, overwrite=..., inputs=[source_dir]) as out:
        hashes = out.write_shards(ckpt, per_shard)      # copied / sliced / new tensors, shards renumbered, new index
        # or: out.replace_tensors(ckpt, produce)        # same tensors, some with new bytes; index copied
        out.finish(ckpt, record, config=new_config)     # config.json, tokenizer & other files, pruning.json

Everything goes into the temporary folder `surgery.io.output_dir.atomic_output_dir` hands out (it
refuses an existing output without --overwrite, locks it, and renames the folder into place when
the block succeeds). Entering early (before a long computation) makes those checks early too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from surgery.errors import CheckpointError
from surgery.io import provenance
from surgery.io.checkpoint import INDEX_NAME, Checkpoint
from surgery.io.identity import file_sha256, known_sha256
from surgery.io.paths import inside
from surgery.io.safetensors_file import TensorInfo
from surgery.io.output_dir import atomic_output_dir
from surgery.io.writer import OutTensor, rewrite_shard, write_safetensors, write_safetensors_hashing

_SHARD_RE = re.compile(r"^(?P<stem>.*?)(?P<idx>\d+)-of-(?P<total>\d+)\.safetensors$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


class DerivedCheckpoint:
    """An output checkpoint folder being written; see the module docstring.

    `inputs`: folders the output must not be (`inputs_label` names them in the error).
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = (),
                 inputs_label: str = "the input checkpoint"):
        self.out_dir = Path(out_dir)
        if any(self.out_dir.resolve() == Path(p).resolve() for p in inputs):
            raise CheckpointError(f"{self.out_dir}: output folder must differ from {inputs_label}")
        self.overwrite = overwrite
        self._stack = contextlib.ExitStack()
        self._depth = 0
        self.tmp: Path | None = None

    def __enter__(self) -> DerivedCheckpoint:
        """Open the output (nested `with` blocks on one writer share it: the outermost one commits)."""
        self._depth += 1
        if self._depth == 1:
            self.tmp = self._stack.enter_context(atomic_output_dir(self.out_dir, self.overwrite))
        return self

    def __exit__(self, *exc: object) -> bool | None:
        self._depth -= 1
        return self._stack.__exit__(*exc) if self._depth == 0 else None

    def write_shards(self, source: Checkpoint, per_shard: dict[str, list[OutTensor]], *, hash_shards: bool = False,
                     progress: bool = False) -> dict[str, str]:
        """Write each source shard's planned tensors (empty shards are dropped and the rest renumbered) and
        the index; returns the source shards' content sha256 (with `hash_shards`, or free from the Hugging
        Face cache), else {}. Shards are independent, so they are written in parallel."""
        nonempty = [s for s in source.shard_names if per_shard[s]]
        names = shard_names(source.shard_names, nonempty)
        bar = tqdm(total=sum(t.nbytes for ts in per_shard.values() for t in ts), unit="B", unit_scale=True,
                   desc="Writing shards", disable=not progress)

        def write_one(shard: str) -> tuple[int, str | None]:
            tensors = per_shard[shard]
            if not tensors:
                return 0, file_sha256(source.dir / shard) if hash_shards else None
            target, meta = inside(self.tmp, names[shard]), source.files[shard].metadata or {"format": "pt"}
            if hash_shards and all(t.data is None for t in tensors):
                size, digest = write_safetensors_hashing(target, tensors, meta, source.files[shard])
            else:  # new in-memory tensors (novice values) cannot ride on the single hashing read
                size = write_safetensors(target, tensors, meta)
                digest = file_sha256(source.dir / shard) if hash_shards else None
            bar.update(sum(t.nbytes for t in tensors))
            return size, digest

        with ThreadPoolExecutor(max_workers=min(len(source.shard_names), os.cpu_count() or 1, 8)) as pool:
            results = dict(zip(source.shard_names, pool.map(write_one, source.shard_names)))
        bar.close()
        written = {s: per_shard[s] for s in nonempty}
        self._write_index(source, written, names, sum(size for size, _ in results.values()))
        return {s: d for s, (_, d) in results.items() if d is not None} or known_sha256(source)

    def _write_index(self, source: Checkpoint, written: dict[str, list[OutTensor]], names: dict[str, str],
                     total_size: int) -> None:
        if source.index is None and len(written) <= 1:
            return
        index = dict(source.index or {})
        metadata = dict(index.get("metadata") or {})
        metadata["total_size"] = total_size
        if "total_parameters" in metadata:
            metadata["total_parameters"] = sum(math.prod(t.shape) for ts in written.values() for t in ts)
        index["metadata"] = metadata
        index["weight_map"] = dict(sorted((t.name, names[s]) for s, ts in written.items() for t in ts))
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def replace_tensors(self, source: Checkpoint, produce: Callable[[TensorInfo], Iterator[bytes] | None],
                        after_shard: Callable[[str], None] | None = None) -> None:
        """Every shard with the same tensors, names and order; `produce(info)` yields a tensor's new bytes
        (None: copied by byte range). The index is copied unchanged."""
        for shard, f in source.files.items():
            rewrite_shard(inside(self.tmp, shard), f, produce)
            if after_shard is not None:
                after_shard(shard)
        if (source.dir / INDEX_NAME).is_file():
            shutil.copy2(source.dir / INDEX_NAME, self.tmp / INDEX_NAME)

    def copy_folder(self, folder: str | Path) -> None:
        """Every file of `folder` as it is (a finished checkpoint whose record `finish_record` then replaces)."""
        shutil.copytree(folder, self.tmp, dirs_exist_ok=True)

    def finish(self, source: Checkpoint, record: dict, config: dict | None = None) -> None:
        """config.json (`config`, or the source's copied unchanged), the source's other files and pruning.json."""
        if config is None:
            shutil.copy2(source.config_path, self.tmp / "config.json")
        else:
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_other_files(source, self.tmp)
        self.finish_record(record)

    def finish_record(self, record: dict) -> None:
        provenance.write(self.tmp, record)


def as_output(out: str | Path | DerivedCheckpoint, overwrite: bool, inputs: Sequence[str | Path] = (),
              inputs_label: str = "the input checkpoint") -> DerivedCheckpoint:
    """A new DerivedCheckpoint for a path, or one a caller opened earlier (to refuse an existing output
    before a long computation) as it is; `with` it to write."""
    if isinstance(out, DerivedCheckpoint):
        return out
    return DerivedCheckpoint(out, overwrite=overwrite, inputs=inputs, inputs_label=inputs_label)


def shard_names(shards: list[str], nonempty: list[str]) -> dict[str, str]:
    """Renumber shards like `model-00002-of-00005` after empty ones are dropped, keeping width and base."""
    parsed = [_SHARD_RE.match(s) for s in shards]
    if len(shards) == 1 or not all(parsed):
        return {s: s for s in nonempty}
    base = min(int(m["idx"]) for m in parsed)
    width = len(parsed[0]["idx"])
    total = len(nonempty) - 1 + base if base == 0 else len(nonempty)
    names = {}
    for i, s in enumerate(nonempty):
        m = _SHARD_RE.match(s)
        names[s] = f"{m['stem']}{base + i:0{width}d}-of-{total:0{len(m['total'])}d}.safetensors"
    return names


def copy_other_files(ckpt: Checkpoint, dest: Path) -> None:
    """Copy tokenizer, generation config, chat template, custom code, README...; skip weight files."""
    skip = set(ckpt.shard_names) | {INDEX_NAME, "config.json", provenance.PRUNING_JSON}
    for src in ckpt.dir.iterdir():
        if src.name in skip or src.name.startswith("."):
            continue
        if src.is_dir():
            shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)))
        elif src.suffix not in WEIGHT_SUFFIXES:  # other weight sets would carry unpruned experts
            shutil.copy2(src, dest / src.name)
