"""Reading a model's weights from the safetensors shards straight into tensors on a device.

`plan_module` says, for every parameter and persistent buffer of a materialised module, which
on-disk tensor (or which slice of which fused tensor) fills it, using the architecture registry's
facts (in-memory renames, per-expert vs fused on disk, fused orientation): nothing here names a model.
`WeightReader` then reads those byte ranges with positioned reads (no memory map, so the host's
resident memory does not grow with the checkpoint):

* on the CPU, straight into the destination tensor's memory when dtypes agree;
* on a CUDA device, through a small ring of pinned host buffers and asynchronous copies on a side
  stream (`fill` returns a CUDA event the compute stream waits on). Host memory in use is the ring,
  never a copy of the model.

`WeightReader.submit` runs `fill` on a background thread, so the next decoder layer is read while
the current one computes (surgery.model.streaming).

Quantized checkpoints (surgery.io.quantization: FP8 block/channel/tensor, NVFP4, MXFP4) are read
dequantized: a parameter whose on-disk tensor is quantized becomes a piece that `dequantize`s its
tensor (with its scales) to float32 on the host, one tensor or one expert at a time, and copies it into
the target in the model's dtype with the same transforms as the unquantized path. The host memory this
takes is one expert's (or one attention matrix's) float32 values, never the model's.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from surgery.architectures import MoELayout
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, ROLE_PATTERNS, memory_fused
from surgery.errors import UserError
from surgery.io import Checkpoint
from surgery.io.quantization import companions, dequantize, is_quantized
from surgery.io.safetensors_file import SafetensorsFile, TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StreamingError(UserError):
    """The architecture cannot be loaded from its shards this way (a parameter has no on-disk tensor)."""


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor and where it goes: `target` (a tensor or a view of one), after `transform`
    ("t": swap the last two axes; "deinterleave": gate = rows ::2, up = rows 1::2, stacked as halves).

    A quantized tensor has `quantized` set: the weight's name as `dequantize` takes it (`W.weight`, or the
    MXFP4 parameter `X`), with `index` the expert slab of a fused tensor (None: the whole tensor) and `ckpt`
    the checkpoint it is read from; `file`/`info` are then those of its stored codes (for ordering only)."""

    target: torch.Tensor
    file: SafetensorsFile
    info: TensorInfo
    transform: tuple[str, ...] = ()
    quantized: str | None = None
    index: int | None = None
    ckpt: Checkpoint | None = None

    @property
    def direct(self) -> bool:
        """Bytes can go straight into the target's memory."""
        return (self.quantized is None and not self.transform and self.target.dtype == TORCH_DTYPES.get(self.info.dtype)
                and self.target.is_contiguous() and tuple(self.target.shape) == tuple(self.info.shape))

    def dequantized(self) -> torch.Tensor:
        """A quantized piece's float32 value on the host, transformed to the target's shape."""
        value = dequantize(self.ckpt, self.quantized, self.index)
        return _apply(torch.from_numpy(np.ascontiguousarray(value)), self.transform)


def _stored(ckpt: Checkpoint, name: str) -> bool:
    """`name` is on disk, as itself or in a quantized form (NVFP4 `W.weight_packed`, MXFP4 `X_blocks`)."""
    names = ckpt.weight_map
    return (name in names or f"{name}_blocks" in names
            or (name.endswith(".weight") and f"{name}_packed" in names))


def disk_name(ckpt: Checkpoint, name: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    """The on-disk tensor holding in-memory parameter `name` (the registry's renames applied), or None.
    A quantized tensor is named as `dequantize` takes it (`W.weight` for NVFP4, `X` for MXFP4 blocks)."""
    if _stored(ckpt, name):
        return name
    for mem, disk in renames:
        cand = name.replace(mem, disk)
        if _stored(ckpt, cand):
            return cand
    return None


def _codes_name(ckpt: Checkpoint, name: str) -> str:
    """The stored tensor holding a (possibly quantized) weight's values: itself, `_packed` or `_blocks`."""
    names = ckpt.weight_map
    if name in names:
        return name
    if f"{name}_blocks" in names:
        return f"{name}_blocks"
    return f"{name}_packed"


def dequantized_shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    """The shape `dequantize(ckpt, name)` returns, from the header alone (storage orientation)."""
    stored = _codes_name(ckpt, name)
    shape = tuple(ckpt.info(stored).shape)
    if stored.endswith("_blocks"):  # [..., G, 16] -> [..., 32 G]
        return (*shape[:-2], shape[-2] * 2 * shape[-1]) if len(shape) >= 2 else shape
    if stored.endswith("_packed"):  # two codes per byte
        return (*shape[:-1], 2 * shape[-1]) if shape else shape
    return shape


def _quantized(ckpt: Checkpoint, name: str) -> bool:
    return is_quantized(ckpt, _codes_name(ckpt, name))


def _piece(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...] = ()) -> Piece:
    if _quantized(ckpt, name):
        return _quantized_piece(ckpt, name, target, transform, None)
    info = ckpt.info(name)
    if info.dtype not in TORCH_DTYPES:
        raise StreamingError(f"{ckpt.dir}: {name} is stored as {info.dtype}, which cannot be loaded this way")
    shape = _transformed_shape(tuple(info.shape), transform)
    if shape != tuple(target.shape):
        raise StreamingError(f"{ckpt.dir}: {name} has shape {list(info.shape)}, the model expects {list(target.shape)}")
    return Piece(target, ckpt.file_of(name), info, transform)


def _quantized_piece(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...],
                     index: int | None) -> Piece:
    shape = dequantized_shape(ckpt, name)
    if index is not None:
        shape = shape[1:]
    if _transformed_shape(shape, transform) != tuple(target.shape):
        raise StreamingError(f"{ckpt.dir}: {name} dequantizes to shape {list(shape)}, the model expects "
                             f"{list(target.shape)}")
    stored = _codes_name(ckpt, name)
    return Piece(target, ckpt.file_of(stored), ckpt.info(stored), transform, quantized=name, index=index, ckpt=ckpt)


def _mxfp4_transform(transform: tuple[str, ...]) -> tuple[str, ...]:
    """MXFP4 dequantizes to the storage orientation (rows = outputs), the transpose of the unquantized tensor
    on disk (gpt-oss: [E, H, 2I] in bf16, [E, 2I, H] as blocks): one more swap of the last two axes."""
    return transform[1:] if transform[:1] == ("t",) else ("t", *transform)


def _pieces(ckpt: Checkpoint, name: str, target: torch.Tensor, transform: tuple[str, ...] = ()) -> list[Piece]:
    """The pieces filling `target` from on-disk `name`: one, or one per expert (axis 0) for a quantized
    tensor with more than two axes (fused experts), so one expert at a time is dequantized in host memory."""
    if not _quantized(ckpt, name):
        return [_piece(ckpt, name, target, transform)]
    if _codes_name(ckpt, name).endswith("_blocks"):
        transform = _mxfp4_transform(transform)
    if len(dequantized_shape(ckpt, name)) <= 2 or target.ndim < 1:
        return [_quantized_piece(ckpt, name, target, transform, None)]
    if target.shape[0] != dequantized_shape(ckpt, name)[0]:
        raise StreamingError(f"{ckpt.dir}: {name} dequantizes to shape {list(dequantized_shape(ckpt, name))}, "
                             f"the model expects {list(target.shape)}")
    return [_quantized_piece(ckpt, name, target[e], transform, e) for e in range(target.shape[0])]


def _transformed_shape(shape: tuple[int, ...], transform: tuple[str, ...]) -> tuple[int, ...]:
    for t in transform:
        if t == "t":
            shape = (*shape[:-2], shape[-1], shape[-2])
    return shape


def _fused_pieces(ckpt: Checkpoint, layout: MoELayout, layer: int, key: str, target: torch.Tensor,
                  roles: tuple[str, ...]) -> list[Piece]:
    """A transformers-5 fused expert parameter ([E, 2I, H] gate rows then up rows, or [E, H, I] down)
    from per-expert tensors (one piece per expert and role, into its rows) or from a fused tensor."""
    entry = layout.layers.get(layer)
    if entry is None:
        raise StreamingError(f"{ckpt.dir}: parameter {key!r} of layer {layer} has no expert tensors on disk")
    spec = layout.spec
    if entry.per_expert:
        pieces = []
        for e in range(target.shape[0]):
            names = [n.removesuffix("_packed") for n in entry.per_expert.get(e, [])]  # NVFP4 as `W.weight`
            row = 0
            for role in roles:
                name = next((n for n in names if ROLE_PATTERNS[role].search(n)), None)
                if name is None:
                    raise StreamingError(f"{ckpt.dir}: layer {layer} expert {e}: no {role} weight on disk "
                                         f"(found {names})")
                rows = dequantized_shape(ckpt, name)[0]
                pieces.append(_piece(ckpt, name, target[e, row:row + rows]))
                row += rows
            if row != target.shape[1]:
                raise StreamingError(f"{ckpt.dir}: layer {layer} expert {e}: {row} rows on disk for {key}, "
                                     f"the model expects {target.shape[1]}")
        return pieces
    pattern = FUSED_GATE_UP if "gate" in roles else FUSED_DOWN
    name = next((n for n in (x.removesuffix("_blocks") for x in entry.fused) if pattern.search(n)), None)
    if name is None:
        raise StreamingError(f"{ckpt.dir}: layer {layer}: no fused tensor on disk for {key} (found {entry.fused})")
    transform = ("t",) if spec.fused_orientation == "in_out" else ()
    if spec.interleaved and "gate" in roles:
        transform += ("deinterleave",)
    return _pieces(ckpt, name, target, transform)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def plan_module(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, layout: MoELayout,
                layer: int | None) -> list[Piece]:
    """Pieces filling every parameter and persistent buffer of `module` (already on its device).
    `layer` None: each name's decoder layer is read from it (`layers.<i>.`). Tensors shared by several names (tied weights) are filled once, from the
    first name that has an on-disk tensor."""
    spec = layout.spec
    by_tensor: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, target in module.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(target), []).append((key, target))
    pieces: list[Piece] = []
    for names in by_tensor.values():
        done = False
        for key, target in names:
            target = target.data
            full = f"{prefix}.{key}" if prefix else key
            index = layer if layer is not None else _layer_of(full)
            fused = memory_fused(key) if index is not None and spec.math.glu_halves else None
            if fused is not None:
                pieces += _fused_pieces(ckpt, layout, index, full, target, fused.roles)
                done = True
                break
            disk = disk_name(ckpt, full, spec.memory_renames)
            if disk is not None:
                pieces += _pieces(ckpt, disk, target)
                done = True
                break
        if not done:
            full = f"{prefix}.{names[0][0]}" if prefix else names[0][0]
            raise StreamingError(f"{ckpt.dir}: no on-disk tensor for parameter {full!r}")
    return pieces


def _pread_into(file: SafetensorsFile, begin: int, buf: np.ndarray) -> None:
    view = memoryview(buf).cast("B")
    pos = 0
    while pos < len(view):
        n = os.preadv(file.fileno(), [view[pos:]], begin + pos)
        if n == 0:
            raise UserError(f"{file.path}: unexpected end of file at byte {begin + pos}")
        pos += n


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _apply(value: torch.Tensor, transform: tuple[str, ...]) -> torch.Tensor:
    for t in transform:
        if t == "t":
            value = value.transpose(-1, -2)
        elif t == "deinterleave":
            value = torch.cat([value[..., 0::2, :], value[..., 1::2, :]], dim=-2)
    return value


class WeightReader:
    """Reads pieces onto `device`; one instance per run (it owns the pinned ring and the side stream).

    `slot_bytes` × `slots` is all the pinned host memory it uses on a CUDA device.
    """

    def __init__(self, device: torch.device | str, slots: int = 8, slot_bytes: int = 16 << 20):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pool: ThreadPoolExecutor | None = None
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.ring = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
            self.ring_events: list[torch.cuda.Event | None] = [None] * slots
            self.slot_bytes = slot_bytes
            self._readers = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="moe-surgery-pread")

    # -- reading ------------------------------------------------------------------------------

    def fill(self, pieces: list[Piece], after: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        """Read every piece into its target. On CUDA the copies are queued on the side stream (after
        `after`, an event of the compute stream) and the returned event marks their end; on the CPU the
        targets are filled when this returns."""
        if not self.cuda:
            for p in pieces:
                self._fill_cpu(p)
            return None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            staged = []
            for p in pieces:
                if p.quantized is not None:
                    continue
                dest = p.target if p.direct else torch.empty(p.info.shape, dtype=TORCH_DTYPES[p.info.dtype],
                                                             device=self.device)
                staged.append((p, dest))
            self._to_device([(p, dest) for p, dest in staged])
            for p, dest in staged:
                if dest is not p.target:
                    p.target.copy_(_apply(dest, p.transform))
            for p in pieces:  # dequantized on the host one tensor (or expert) at a time, converted on the device
                if p.quantized is not None:
                    p.target.copy_(p.dequantized().to(self.device))
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def _fill_cpu(self, p: Piece) -> None:
        if p.quantized is not None:
            p.target.copy_(p.dequantized())
            return
        if p.direct:
            _pread_into(p.file, p.info.begin, _bytes_of(p.target))
            return
        staged = torch.empty(p.info.shape, dtype=TORCH_DTYPES[p.info.dtype])
        _pread_into(p.file, p.info.begin, _bytes_of(staged))
        p.target.copy_(_apply(staged, p.transform))

    def _to_device(self, work: list[tuple[Piece, torch.Tensor]]) -> None:
        """Each piece's bytes into its `dest` (contiguous, on the device) through the pinned ring, a wave of
        `slots` chunks at a time: the wave's reads run in parallel threads (positioned reads release the
        GIL; one thread cannot keep up with the copy engine), then its copies are queued in order."""
        chunks = []
        for p, dest in work:
            flat = dest.reshape(-1).view(torch.uint8)
            for pos in range(0, p.info.nbytes, self.slot_bytes):
                n = min(self.slot_bytes, p.info.nbytes - pos)
                chunks.append((p.file, p.info.begin + pos, flat[pos:pos + n]))
        slots = len(self.ring)
        for first in range(0, len(chunks), slots):
            wave = chunks[first:first + slots]
            for slot in range(len(wave)):
                if self.ring_events[slot] is not None:
                    self.ring_events[slot].synchronize()  # its previous copy has left the buffer
            bufs = [self.ring[slot][:len(out)] for slot, (_, _, out) in enumerate(wave)]
            list(self._readers.map(lambda job: _pread_into(job[0][0], job[0][1], job[1].numpy()), zip(wave, bufs)))
            for slot, ((_, _, out), buf) in enumerate(zip(wave, bufs)):
                out.copy_(buf, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
                self.ring_events[slot] = event

    def load(self, pieces: list[Piece]) -> None:
        """Read every piece now; on CUDA the compute stream then waits for the copies (no host sync)."""
        if not self.cuda:
            self.fill(pieces)
            return
        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(self.device))
        torch.cuda.current_stream(self.device).wait_event(self.fill(pieces, after))

    # -- in the background ----------------------------------------------------------------------

    def submit(self, pieces: list[Piece]) -> "Pending":
        """Start `fill(pieces)` on the reader thread; the compute stream's work queued so far comes first
        (the targets may reuse memory that work still reads)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-surgery-weights")
        after = None
        if self.cuda:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        return Pending(self._pool.submit(self.fill, pieces, after), self.device)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.cuda:
            self.stream.synchronize()
            self._readers.shutdown(wait=True)


class Pending:
    """Weights being read in the background; `wait()` makes the compute stream wait for them."""

    def __init__(self, future: Future, device: torch.device):
        self.future = future
        self.device = device

    def wait(self) -> None:
        event = self.future.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def plain_config(config):
    """`config` without `quantization_config` (a copy; `config` itself when it has none), so that
    `from_config` builds a plain module tree that dequantized weights are read into."""
    import copy

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "quantization_config", None) is None and getattr(text, "quantization_config", None) is None:
        return config
    config = copy.deepcopy(config)
    for cfg in {id(c): c for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else config)
                }.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    return config


def estimate_bytes(ckpt: Checkpoint, dtype: torch.dtype | None) -> int:
    """Bytes the checkpoint's floating tensors take in `dtype` (None: as stored), from the shard headers.
    A quantized weight counts as its dequantized values in `dtype` (bf16 when None); its scales count nothing."""
    names = ckpt.names()
    quantized = {n for n in names if is_quantized(ckpt, n) and not n.endswith(("_scale", "_scales", "_scale_inv"))}
    skip = {c for n in quantized for c in companions(n, ckpt.weight_map)} - quantized
    total = 0
    for name in names:
        if name in skip:
            continue
        if name in quantized:
            logical = name.removesuffix("_blocks").removesuffix("_packed")
            total += int(np.prod(dequantized_shape(ckpt, logical), dtype=np.int64)) * (dtype or torch.bfloat16).itemsize
            continue
        info = ckpt.info(name)
        stored = TORCH_DTYPES.get(info.dtype)
        if dtype is not None and stored is not None and stored.is_floating_point:
            total += info.nbytes // stored.itemsize * dtype.itemsize
        else:
            total += info.nbytes
    return total
