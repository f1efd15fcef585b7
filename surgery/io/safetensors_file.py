"""One safetensors file: a validated header and byte ranges read with positioned reads.

We never mmap tensor data for copying: file-backed pages would count against the
process's resident set. Positioned reads (and `copy_file_range` in the writer) keep
peak RSS flat however large the checkpoint is.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import CheckpointError
from surgery.io.paths import short_repr, show

if TYPE_CHECKING:  # numpy is imported by `decode` only: copying tensors never needs it
    import numpy as np

# Bits per element of every dtype the safetensors format defines (0.8).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

_NUMPY = {  # numpy dtype names
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
}

MAX_HEADER = 100 * 1024 * 1024
MAX_DIM = 1 << 63  # a dimension, an element count and an offset all fit a signed 64-bit integer
MAX_DIMS = 1024


class _DuplicateKey(ValueError):
    """A JSON object names one key twice: refused, since readers would disagree on which one counts."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects must not repeat a key: parsers disagree on which one wins (first or last)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {short_repr(k)} appears twice")
        out[k] = v
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: str | bytes) -> object:
    """Parse JSON as the format requires: no NaN/Infinity, no repeated keys. Raises ValueError
    (JSONDecodeError included) or RecursionError; the caller turns them into one-line errors."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)


def one_line(text: object) -> str:
    """`text` with every line break (as str.splitlines sees them) turned into a space."""
    return " ".join(str(text).splitlines())


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """`n` bytes at `offset`, or fewer if the file ends first."""
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool, not float


def _is_small(x: int) -> bool:
    return -MAX_DIM < x < MAX_DIM


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype and shape occupies; sub-byte dtypes must fill whole bytes."""
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype}{list(shape)} does not end on a byte boundary")
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


_VALIDATED: dict[tuple[bytes, int], tuple[dict[str, "TensorInfo"], dict[str, str]]] = {}
"""Headers this process validated, by (header bytes, file size): the same shard is opened by the rewrite and
then by the model card's counts, and a header's validity depends on nothing else."""


class SafetensorsFile:
    """A safetensors file whose header has been fully validated on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._fd: int | None = None
        self._parse()

    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{show(self.path)}: {one_line(problem)}")

    def _parse(self) -> None:
        """Validate the whole header; any bytes give either a parsed file or a one-line CheckpointError."""
        try:
            # O_NONBLOCK: a FIFO named like a shard must not hang the open; it is refused below.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._fail("file not found") from None
        except OSError as e:
            raise self._fail(f"cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise self._fail("is a directory, not a safetensors file")
            if not stat.S_ISREG(st.st_mode):
                raise self._fail("not a regular file")
            size = st.st_size
            if size < 8:
                raise self._fail(f"truncated: {size} bytes, too short for a safetensors header")
            head = _pread_exact(fd, 8, 0)
            if len(head) < 8:
                raise self._fail("truncated while reading the header length")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8:
                raise self._fail(f"header length {hlen} runs past the end of the file ({size} bytes)")
            if hlen > MAX_HEADER:
                raise self._fail(f"header length {hlen} is implausibly large")
            raw = _pread_exact(fd, hlen, 8)
            if len(raw) < hlen:
                raise self._fail(f"truncated: the file ends inside the {hlen}-byte header")
        except OSError as e:
            raise self._fail(f"cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        if (raw, size) in _VALIDATED:
            tensors, meta = _VALIDATED[raw, size]
            self.tensors, self.metadata = dict(tensors), dict(meta)
            return
        try:
            header = strict_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._fail(f"corrupt header JSON ({e.__class__.__name__}: {one_line(e)[:200]})") from None
        self._validate(header, size - 8 - hlen, 8 + hlen)
        _VALIDATED[raw, size] = (dict(self.tensors), dict(self.metadata))

    def _validate(self, header: object, data_len: int, data_start: int) -> None:
        if not isinstance(header, dict):
            raise self._fail("corrupt header: not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("corrupt header: __metadata__ is not an object")
        try:
            self.metadata = {str(k): str(v) for k, v in meta.items()}
        except (ValueError, RecursionError):
            raise self._fail("corrupt header: __metadata__ holds values that cannot be represented") from None
        spans = []
        for name, entry in header.items():
            label = short_repr(name)
            if not isinstance(entry, dict):
                raise self._fail(f"corrupt header entry for tensor {label} (not an object)")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if dtype is None or shape is None or offsets is None:
                raise self._fail(f"corrupt header entry for tensor {label} (needs dtype, shape and data_offsets)")
            if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
                raise self._fail(f"tensor {label} has unknown dtype {short_repr(dtype)}")
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
                raise self._fail(f"corrupt header entry for tensor {label} (shape is not a list of integers)")
            if len(shape) > MAX_DIMS:
                raise self._fail(f"tensor {label} has {len(shape)} dimensions")
            if any(d < 0 for d in shape):
                raise self._fail(f"tensor {label} has a negative dimension {short_repr(shape)}")
            if any(d >= MAX_DIM for d in shape):
                raise self._fail(f"tensor {label} has an impossibly large dimension {short_repr(shape)}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)):
                raise self._fail(f"corrupt header entry for tensor {label} (data_offsets is not two integers)")
            b, e = offsets
            if not 0 <= b <= e <= data_len:
                shown = f" [{b}, {e}]" if _is_small(b) and _is_small(e) else ""
                if b < 0 or e < 0:
                    raise self._fail(f"tensor {label} has negative data_offsets{shown}")
                if b > e:
                    raise self._fail(f"tensor {label} data_offsets{shown} are reversed (begin after end)")
                raise self._fail(
                    f"tensor {label} offsets{shown} are out of range (data is {data_len} bytes; file truncated?)"
                    if shown else f"tensor {label} offsets are out of range (data is {data_len} bytes)"
                )
            numel = 0 if 0 in shape else 1
            for d in shape if numel else ():
                numel *= d
                if numel >= MAX_DIM:
                    raise self._fail(f"tensor {label} has an impossibly large shape {short_repr(shape)}")
            bits = numel * DTYPE_BITS[dtype]
            if bits % 8:
                raise self._fail(f"tensor {label}: {dtype}{short_repr(shape)} does not end on a byte boundary")
            want = bits // 8
            if e - b != want:
                raise self._fail(f"tensor {label} spans {e - b} bytes but {dtype}{short_repr(shape)} needs {want}")
            spans.append((b, e, name))
            self.tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e)
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(f"tensors {short_repr(n0)} and {short_repr(n1)} overlap in the data section")

    def fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read_range(self, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of the file, by positioned read."""
        out = bytearray(end - begin)
        view = memoryview(out)
        pos = 0
        while pos < len(out):
            chunk = os.preadv(self.fileno(), [view[pos:]], begin + pos)
            if chunk == 0:
                raise self._fail(f"unexpected end of file at byte {begin + pos}")
            pos += chunk
        return bytes(out)

    def read_bytes(self, name: str) -> bytes:
        info = self.tensors[name]
        return self.read_range(info.begin, info.end)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a numpy array; BF16 is widened to float32 (exactly), FP8/F4 are refused."""
        info = self.tensors[name]
        return decode(self.read_bytes(name), info.dtype, info.shape, where=f"{self.path}: tensor {name!r}")


def decode(raw: bytes, dtype: str, shape: tuple[int, ...], where: str = "") -> np.ndarray:
    """Turn raw little-endian bytes into a numpy array (BF16 becomes float32 exactly)."""
    import numpy as np

    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if dtype not in _NUMPY:
        raise CheckpointError(f"{where}: dtype {dtype} cannot be read as numbers here (quantized?)")
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).reshape(shape)
