"""One safetensors file: a validated header and byte ranges read with positioned reads.

We never mmap tensor data for copying: file-backed pages would count against the
process's resident set. Positioned reads (and `copy_file_range` in the writer) keep
peak RSS flat however large the checkpoint is.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.errors import UserError

# Bits per element of every dtype the safetensors format defines (0.8).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

_NUMPY = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
    "F16": np.float16, "I32": np.int32, "U32": np.uint32, "F32": np.float32,
    "F64": np.float64, "I64": np.int64, "U64": np.uint64, "C64": np.complex64,
}

MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError):
    """Bad input: the message is one line naming the file and the problem."""


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


class SafetensorsFile:
    """A safetensors file whose header has been fully validated on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._fd: int | None = None
        self._parse()

    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise self._fail("file not found") from None
        if size < 8:
            raise self._fail(f"truncated: {size} bytes, too short for a safetensors header")
        with open(self.path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise self._fail(f"header length {hlen} runs past the end of the file ({size} bytes)")
            if hlen > MAX_HEADER:
                raise self._fail(f"header length {hlen} is implausibly large")
            raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"corrupt header JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header: not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("corrupt header: __metadata__ is not an object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        data_start = 8 + hlen
        data_len = size - data_start
        spans = []
        for name, entry in header.items():
            try:
                dtype = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                b, e = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"corrupt header entry for tensor {name!r}") from None
            if dtype not in DTYPE_BITS:
                raise self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
            if any(d < 0 for d in shape):
                raise self._fail(f"tensor {name!r} has a negative dimension {list(shape)}")
            if not 0 <= b <= e <= data_len:
                raise self._fail(
                    f"tensor {name!r} offsets [{b}, {e}] are out of range (data is {data_len} bytes; file truncated?)"
                )
            try:
                want = nbytes(dtype, shape)
            except ValueError as err:
                raise self._fail(f"tensor {name!r}: {err}") from None
            if e - b != want:
                raise self._fail(f"tensor {name!r} spans {e - b} bytes but {dtype}{list(shape)} needs {want}")
            spans.append((b, e, name))
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(f"tensors {n0!r} and {n1!r} overlap in the data section")

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
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if dtype not in _NUMPY:
        raise CheckpointError(f"{where}: dtype {dtype} cannot be read as numbers here (quantized?)")
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).reshape(shape)
