"""Writing safetensors shards from byte ranges of other files (into folders from surgery.io.output_dir).

Every writer here creates its file only directly inside a temporary folder handed out by
`atomic_output_dir` (build targets with `surgery.io.paths.inside(tmp, name)`), never follows a
symbolic link at the target and never opens an existing file: the folder is new, so O_EXCL holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from surgery.io.output_dir import open_target
from surgery.io.paths import show
from surgery.io.safetensors_file import CheckpointError, SafetensorsFile, TensorInfo, nbytes

CHUNK = 64 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
READ_AHEAD = 256 * 1024 * 1024  # bytes of kept ranges announced to the kernel ahead of the copy


@dataclass
class OutTensor:
    """A tensor to write: its bytes are the concatenation of `ranges` (file, begin, end), `data`, or the
    pieces `stream()` yields when the tensor is written (so that only one tensor is in memory at a time)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: list[tuple[SafetensorsFile, int, int]] = field(default_factory=list)
    data: bytes | None = None
    stream: Callable[[], Iterator[bytes]] | None = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


# copy_file_range errors that mean "not here": fall back to read + write.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF,
                       errno.EPERM, errno.ETXTBSY}

# Temporary folders handed out by atomic_output_dir and still open: (st_dev, st_ino) -> folder fd.


def _copy_range(src: SafetensorsFile, begin: int, end: int, dst_fd: int) -> None:
    """Copy file bytes in the kernel when possible (no user-space buffer, no RSS growth)."""
    sfd = src.fileno()
    remaining = end - begin
    off = begin
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(sfd, dst_fd, min(remaining, 1 << 30), off)
                if n == 0:
                    raise CheckpointError(f"{show(src.path)}: unexpected end of file at byte {off}")
                off += n
                remaining -= n
            return
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise  # disk full, read-only, I/O error: the buffered copy would fail the same way
            # cross-device or unsupported filesystem: fall back to buffered copy from where it stopped
    while remaining:
        buf = os.pread(sfd, min(remaining, CHUNK), off)
        if not buf:
            raise CheckpointError(f"{show(src.path)}: unexpected end of file at byte {off}")
        _write_all(dst_fd, buf)
        off += len(buf)
        remaining -= len(buf)


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """The serialised header (8-byte length + JSON padded to 8 bytes) and the data-section size."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        size = t.nbytes
        have = len(t.data) if t.data is not None else sum(e - b for _, b, e in t.ranges)
        if t.stream is None and have != size:
            raise ValueError(f"{t.name}: {have} bytes supplied for {t.dtype}{list(t.shape)} ({size} needed)")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, offset


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file sequentially; returns the data-section size in bytes.

    `path` must be `inside(tmp, name)` for a folder `tmp` from atomic_output_dir (see `_open_target`).
    """
    head, size = _header_bytes(tensors, metadata)
    ranges = [r for t in tensors for r in t.ranges]
    ahead = _ReadAhead(ranges)
    fd = open_target(path)
    try:
        _write_all(fd, head)
        done = 0
        for t in tensors:
            if t.stream is not None:
                _write_stream(fd, t.name, t.stream(), t.nbytes)
            elif t.data is not None:
                _write_all(fd, t.data)
                continue
            for src, b, e in t.ranges:
                ahead.advance(done)
                _copy_range(src, b, e, fd)
                done += 1
    finally:
        os.close(fd)
    return size


class _ReadAhead:
    """Asks the kernel to start reading the next READ_AHEAD bytes of kept ranges while the current one is
    copied: on a cold page cache the kept tensors are scattered reads that the kernel's own sequential
    read-ahead does not anticipate, so without the hint each copy waits for its own reads."""

    def __init__(self, ranges: list[tuple[SafetensorsFile, int, int]]) -> None:
        self.ranges = ranges
        self.hinted = 0  # ranges[:hinted] have been announced
        self.copied = 0  # ranges[:copied] have been copied
        self.pending = 0  # bytes announced and not yet copied

    def advance(self, current: int) -> None:
        """Called before copying ranges[current]."""
        for _, b, e in self.ranges[self.copied:current]:
            self.pending -= e - b
        self.copied = current
        while self.hinted < len(self.ranges) and (self.hinted <= current or self.pending < READ_AHEAD):
            src, b, e = self.ranges[self.hinted]
            try:
                os.posix_fadvise(src.fileno(), b, e - b, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                self.hinted = len(self.ranges)  # a hint only: without it the copy goes on as before
                return
            self.pending += e - b
            self.hinted += 1


def write_safetensors_hashing(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None,
                              source: SafetensorsFile) -> tuple[int, str]:
    """Like write_safetensors for tensors cut from one source file, reading that file once, in order,
    and returning its sha256 too: provenance costs no second read of the input.

    Every range must come from `source` and ranges must ascend (the rewriter keeps source order).
    """
    head, size = _header_bytes(tensors, metadata)
    ranges = [(b, e) for t in tensors for src, b, e in t.ranges if src is source]
    if any(t.data is not None or t.stream is not None or any(src is not source for src, _, _ in t.ranges) for t in tensors) or any(
        e0 > b1 for (_, e0), (b1, _) in zip(ranges, ranges[1:])
    ):
        raise ValueError("write_safetensors_hashing needs ascending byte ranges of one source file")
    digest = hashlib.sha256()
    sfd = source.fileno()
    end_of_file = os.fstat(sfd).st_size
    fd = open_target(path)
    state = {"i": 0}

    def write_kept(buf: bytes, pos: int) -> None:
        end, i = pos + len(buf), state["i"]
        while i < len(ranges) and ranges[i][0] < end:
            b, e = ranges[i]
            lo, hi = max(b, pos), min(e, end)
            _write_all(fd, memoryview(buf)[lo - pos:hi - pos])
            if e > end:
                break
            i += 1
        state["i"] = i

    # Read, hash and write overlap (each releases the GIL): time is the slowest of the three, not their sum.
    try:
        _write_all(fd, head)
        with ThreadPoolExecutor(max_workers=2) as pool:
            pos, pending = 0, []
            buf = os.pread(sfd, min(HASH_CHUNK, end_of_file), 0)
            while buf:
                for f in pending:
                    f.result()
                pending = [pool.submit(digest.update, buf), pool.submit(write_kept, buf, pos)]
                pos += len(buf)
                buf = os.pread(sfd, min(HASH_CHUNK, end_of_file - pos), pos) if pos < end_of_file else b""
            for f in pending:
                f.result()
        if pos != end_of_file:
            raise CheckpointError(f"{show(source.path)}: unexpected end of file at byte {pos}")
    finally:
        os.close(fd)
    return size, digest.hexdigest()


# OSErrors that say something about the place we write to (not a bug): one line naming the output.


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_stream(fd: int, name: str, pieces: Iterator[bytes], size: int) -> None:
    written = 0
    for piece in pieces:
        _write_all(fd, piece)
        written += len(piece)
    if written != size:
        raise RuntimeError(f"{name}: produced {written} bytes for {size}")


def rewrite_shard(path: Path, src: SafetensorsFile, produce: Callable[[TensorInfo], Iterator[bytes] | None]) -> None:
    """Rewrite one shard with the same tensors, dtypes, shapes and order, header computed upfront.

    `produce(info)` yields a tensor's new bytes piece by piece, or None to copy it by byte range.
    `path` must be `inside(tmp, name)` for a folder `tmp` from atomic_output_dir (see `_open_target`).
    """
    tensors = sorted(src.tensors.values(), key=lambda t: t.begin)
    header: dict = {"__metadata__": src.metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # same alignment as surgery.io.write_safetensors
    fd = open_target(path)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            pieces = produce(t)
            if pieces is None:
                _copy_range(src, t.begin, t.end, fd)
            else:
                _write_stream(fd, t.name, pieces, t.nbytes)
    finally:
        os.close(fd)
