"""The one writer of derived checkpoints: a new folder made from a source checkpoint, written atomically.

    with DerivedCheckpoint(out_dir, overwrite=..., inputs=[source_dir]) as out:
        hashes = out.write_shards(ckpt, per_shard)      # copied / sliced / new tensors, shards renumbered, new index
        # or: out.replace_tensors(ckpt, produce)        # same tensors, some with new bytes; index copied
        out.finish(ckpt, record, config=new_config)     # config.json, tokenizer & other files, pruning.json

Everything goes into the temporary folder `surgery.io.output_dir.atomic_output_dir` hands out (it
refuses an existing output without --overwrite, locks it, and renames the folder into place when
the block succeeds). Entering early (before a long computation) makes those checks early too.

Nothing written is named by the input: shard names are generated (`shard_names`: the input's
`model-0000i-of-0000N` scheme renumbered, else `model-0000i-of-0000N.safetensors`), so a shard the
index keeps in a subfolder comes out flat. Side files (tokenizer, README...) are copied only when they
resolve inside the source folder or into the Hugging Face cache (`surgery.io.paths.contained`): a
`tokenizer.json -> ~/.ssh/id_rsa` link is refused before anything is written. An output folder that is,
contains or lies inside an input folder is refused before anything is created or removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from surgery.errors import CheckpointError
from surgery.io import provenance
from surgery.io.checkpoint import INDEX_NAME, Checkpoint
from surgery.io.identity import file_sha256, known_sha256
from surgery.io.paths import contained, inside, is_plain_name, show
from surgery.io.safetensors_file import TensorInfo
from surgery.io.output_dir import atomic_output_dir
from surgery.io.writer import OutTensor, rewrite_shard, write_safetensors, write_safetensors_hashing

_SHARD_RE = re.compile(r"^(?P<stem>.*?)(?P<idx>\d+)-of-(?P<total>\d+)\.safetensors$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
BAR_MIN_BYTES = 256 * 2**20  # smaller rewrites finish before a bar would say anything


class DerivedCheckpoint:
    """An output checkpoint folder being written; see the module docstring.

    `inputs`: folders the output must not be (`inputs_label` names them in the error).
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = (),
                 inputs_label: str = "the input checkpoint"):
        self.out_dir = Path(out_dir)
        for p in inputs:
            _check_apart(self.out_dir, Path(p), inputs_label)
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
        side_files(source)  # a side file linked out of the folder is refused before any shard is written
        nonempty = [s for s in source.shard_names if per_shard[s]]
        names = shard_names(source.shard_names, nonempty, single=source.index is None)
        bar = _bytes_bar(sum(t.nbytes for ts in per_shard.values() for t in ts), progress)

        def write_one(shard: str) -> tuple[int, str | None]:
            tensors = per_shard[shard]
            if not tensors:
                return 0, file_sha256(source.dir / shard) if hash_shards else None
            target, meta = inside(self.tmp, names[shard]), source.files[shard].metadata or {"format": "pt"}
            if hash_shards and all(t.data is None and t.stream is None for t in tensors):
                size, digest = write_safetensors_hashing(target, tensors, meta, source.files[shard])
            else:  # new in-memory tensors (novice values) cannot ride on the single hashing read
                size = write_safetensors(target, tensors, meta)
                digest = file_sha256(source.dir / shard) if hash_shards else None
            bar.update(sum(t.nbytes for t in tensors))
            return size, digest

        with bar, ThreadPoolExecutor(max_workers=min(len(source.shard_names), os.cpu_count() or 1, 8)) as pool:
            results = dict(zip(source.shard_names, pool.map(write_one, source.shard_names)))
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
        (None: copied by byte range). Shards get generated names (see `shard_names`); the index is the
        source's with its weight_map pointed at them."""
        side_files(source)
        names = shard_names(source.shard_names, source.shard_names, single=source.index is None)
        for shard, f in source.files.items():
            rewrite_shard(inside(self.tmp, names[shard]), f, produce)
            if after_shard is not None:
                after_shard(shard)
        if source.index is not None:
            index = dict(source.index)
            index["weight_map"] = {t: names[s] for t, s in source.index["weight_map"].items()}
            _write_new(self.tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")

    def copy_folder(self, folder: str | Path) -> None:
        """Every file of `folder` as it is (a finished checkpoint whose record `finish_record` then replaces);
        files linked out of `folder` are refused, as for side files."""
        folder = Path(folder)
        for src, rel in _walk(folder, skip=set()):
            _copy_entry(src, self.tmp / rel)

    def finish(self, source: Checkpoint, record: dict, config: dict | None = None) -> None:
        """config.json (`config`, or the source's copied unchanged), the source's other files and pruning.json."""
        if config is None:
            _copy_entry(source.config_path, self.tmp / "config.json")
        else:
            _write_new(self.tmp / "config.json", json.dumps(config, indent=2) + "\n")
        copy_other_files(source, self.tmp)
        self.finish_record(record)

    def finish_record(self, record: dict) -> None:
        provenance.write(self.tmp, record)


class _NoBar(contextlib.nullcontext):
    def update(self, n: int) -> None:
        """Nothing to show."""


def _bytes_bar(total: int, progress: bool):
    """A byte progress bar, or none when off or when the write is too small to watch: a copy under
    BAR_MIN_BYTES ends in well under a second, and tqdm's import alone is a tenth of `prune`'s start-up."""
    if not progress or total < BAR_MIN_BYTES:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards")


def as_output(out: str | Path | DerivedCheckpoint, overwrite: bool, inputs: Sequence[str | Path] = (),
              inputs_label: str = "the input checkpoint") -> DerivedCheckpoint:
    """A new DerivedCheckpoint for a path, or one a caller opened earlier (to refuse an existing output
    before a long computation) as it is; `with` it to write."""
    if isinstance(out, DerivedCheckpoint):
        return out
    return DerivedCheckpoint(out, overwrite=overwrite, inputs=inputs, inputs_label=inputs_label)


_STEM_RE = re.compile(r"[A-Za-z0-9_.-]{0,64}")


def shard_names(shards: list[str], nonempty: list[str], single: bool = False) -> dict[str, str]:
    """Output names for the `nonempty` source shards, generated, never taken from the input: the source's
    `<stem>0000i-of-0000N.safetensors` scheme renumbered after empty shards are dropped (keeping base,
    width and a plain stem), else `model-0000i-of-0000N.safetensors`; `model.safetensors` for the one
    shard of a checkpoint without an index (`single`). Names are unique (checked)."""
    if single and len(nonempty) == 1:
        return {nonempty[0]: "model.safetensors"}
    parsed = [_SHARD_RE.match(s) for s in shards]
    stems = {m["stem"] for m in parsed if m}
    if len(shards) > 1 and all(parsed) and len(stems) == 1 and _STEM_RE.fullmatch(next(iter(stems))):
        stem = next(iter(stems))
        base = min(int(m["idx"]) for m in parsed)
        base = base if base in (0, 1) else 1
        width = max(5, len(parsed[0]["idx"])) if len({len(m["idx"]) for m in parsed}) > 1 else len(parsed[0]["idx"])
        total_width = len(parsed[0]["total"])
    else:
        stem, base, width, total_width = "model-", 1, 5, 5
    total = len(nonempty) - 1 + base if base == 0 else len(nonempty)
    names = {s: f"{stem}{base + i:0{width}d}-of-{total:0{total_width}d}.safetensors" for i, s in enumerate(nonempty)}
    if len(set(names.values())) != len(names) or not all(is_plain_name(n) for n in names.values()):
        raise CheckpointError(f"generated shard names collide: {sorted(names.values())}")  # cannot happen
    return names


def _check_apart(out: Path, source: Path, label: str) -> None:
    """Refuse an output folder that is `source`, contains it (--overwrite would delete the input) or lies
    inside it (the input would change), symbolic links resolved."""
    real_out, real_in = os.path.realpath(out), os.path.realpath(source)
    if real_out == real_in:
        raise CheckpointError(f"{show(out)}: output folder must differ from {label} ({show(source)})")
    if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{show(out)}: output folder contains {label} ({show(source)}); "
                              "choose an output folder outside it")
    if real_out.startswith(real_in.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{show(out)}: output folder is inside {label} ({show(source)}); "
                              "choose an output folder outside it")


def _walk(root: Path, skip: set[str], weights: bool = True) -> Iterator[tuple[Path, Path]]:
    """(path, path relative to `root`) of every file and folder to copy from `root`, parents first: hidden
    names, `skip` (top level) and, unless `weights`, weight files are left out; a file or folder that
    resolves outside `root` (and is no Hugging Face cache blob) or is no regular file is refused."""
    stack: list[tuple[Path, Path]] = [(root, Path())]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise CheckpointError(f"{show(folder)}: cannot list the folder ({e.strerror})") from None
        for entry in entries:
            name = entry.name
            if name.startswith(".") or (rel == Path() and name in skip):
                continue
            path = Path(entry.path)
            if not contained(root, path):
                raise CheckpointError(f"{show(path)}: a symbolic link to {show(os.path.realpath(path))}, outside "
                                      f"{show(root)} (refused: copy the file into the folder, or remove it)")
            try:
                st = os.stat(path)
            except OSError as e:
                raise CheckpointError(f"{show(path)}: cannot read ({e.strerror})") from None
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    raise CheckpointError(f"{show(path)}: a folder seen twice (a symbolic link loop?); refused")
                seen.add((st.st_dev, st.st_ino))
                yield path, rel / name
                stack.append((path, rel / name))
            elif not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{show(path)}: not a regular file (refused: remove it from the folder)")
            elif weights or not name.endswith(WEIGHT_SUFFIXES):
                yield path, rel / name


def _write_new(dest: Path, text: str) -> None:
    """A new text file in the output (never through a link, never over an existing file)."""
    fd = _create(dest)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _create(dest: Path) -> int:
    try:
        return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        raise CheckpointError(f"{show(dest)}: two files of the output have this name (refused)") from None


def _copy_entry(src: Path, dest: Path) -> None:
    """Copy a file (contents and permission bits) to a new path of the output, making its folders as
    needed (a folder alone is not copied: a subfolder that held only weights leaves no empty folder)."""
    if src.is_dir():
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"{show(dest.parent)}: two files of the output have this name (refused)") from None
    fd = _create(dest)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)
    with contextlib.suppress(OSError):
        os.chmod(dest, stat.S_IMODE(os.stat(src).st_mode) | stat.S_IRUSR | stat.S_IWUSR, follow_symlinks=False)


def side_files(ckpt: Checkpoint) -> list[tuple[Path, Path]]:
    """The files and folders `copy_other_files` copies (tokenizer, generation config, chat template, custom
    code, README...; no weight files, which would carry unpruned experts), checked: see `_walk`."""
    skip = set(ckpt.shard_names) | {INDEX_NAME, "config.json", provenance.PRUNING_JSON}
    return list(_walk(ckpt.dir, skip, weights=False))


def copy_other_files(ckpt: Checkpoint, dest: Path) -> None:
    """Copy the source's side files (see `side_files`) into `dest`, a new output folder."""
    for src, rel in side_files(ckpt):
        _copy_entry(src, dest / rel)
