"""Reading planned pieces (surgery.model.weights.plan_module) into tensors on a device.

Positioned reads, no memory map, so the host's resident memory does not grow with the checkpoint:
on the CPU straight into the destination tensor's memory when dtypes agree; on a CUDA device through a
small ring of pinned host buffers and asynchronous copies on a side stream (`fill` returns a CUDA event
the compute stream waits on). `WeightReader.submit` runs `fill` on a background thread, so the next
decoder layer is read while the current one computes (surgery.model.streaming). Quantized pieces are
read the same way as raw bytes (their codes and scales, 0.5-1 byte per value) and decoded on the device
by torch (surgery.model.dequant), a batch of at most `QUANT_BATCH_BYTES` of codes at a time.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from surgery.errors import UserError
from surgery.io.safetensors_file import SafetensorsFile
from surgery.model.dequant import decode
from surgery.model.weights import TORCH_DTYPES, Piece, apply_transform


def _pread_into(file: SafetensorsFile, begin: int, buf: np.ndarray) -> None:
    view = memoryview(buf).cast("B")
    pos = 0
    while pos < len(view):
        n = os.preadv(file.fileno(), [view[pos:]], begin + pos)
        if n == 0:
            raise UserError(f"{file.path}: unexpected end of file at byte {begin + pos}")
        pos += n


QUANT_BATCH_BYTES = 1 << 30  # raw codes staged on the device at once (a layer's experts in a few batches)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


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
                if p.quantized is None:
                    self._fill_cpu(p)
                else:
                    self._decode_cpu(p)
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
            self._to_device([(p.file, p.info.begin, p.info.nbytes, dest) for p, dest in staged])
            for p, dest in staged:
                if dest is not p.target:
                    p.target.copy_(apply_transform(dest, p.transform))
            batch: list[Piece] = []
            size = 0
            for p in pieces:
                if p.quantized is not None:
                    batch.append(p)
                    size += p.encoded.nbytes
                    if size >= QUANT_BATCH_BYTES:
                        self._decode_cuda(batch)
                        batch, size = [], 0
            self._decode_cuda(batch)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def _decode_cuda(self, batch: list[Piece]) -> None:
        """Quantized pieces' codes and scales to the device as bytes (through the ring), then decoded there
        into their targets, all queued on the side stream (staging freed in stream order)."""
        raws = [{role: torch.empty(span.nbytes, dtype=torch.uint8, device=self.device)
                 for role, span in p.encoded.parts.items()} for p in batch]
        self._to_device([(span.file, span.begin, span.nbytes, raw[role])
                         for p, raw in zip(batch, raws) for role, span in p.encoded.parts.items()])
        for p, raw in zip(batch, raws):
            p.target.copy_(apply_transform(decode(p.encoded, raw), p.transform))

    def _decode_cpu(self, p: Piece) -> None:
        """A quantized piece on the CPU: its raw parts by positioned reads, decoded by the same torch code."""
        raw = {}
        for role, span in p.encoded.parts.items():
            raw[role] = torch.empty(span.nbytes, dtype=torch.uint8)
            _pread_into(span.file, span.begin, raw[role].numpy())
        p.target.copy_(apply_transform(decode(p.encoded, raw), p.transform))

    def _fill_cpu(self, p: Piece) -> None:
        if p.direct:
            _pread_into(p.file, p.info.begin, _bytes_of(p.target))
            return
        staged = torch.empty(p.info.shape, dtype=TORCH_DTYPES[p.info.dtype])
        _pread_into(p.file, p.info.begin, _bytes_of(staged))
        p.target.copy_(apply_transform(staged, p.transform))

    def _to_device(self, work: list[tuple[SafetensorsFile, int, int, torch.Tensor]]) -> None:
        """Each (file, begin, nbytes, dest) byte range into `dest` (contiguous, on the device) through the
        pinned ring, a wave of `slots` chunks at a time: the wave's reads run in parallel threads (positioned
        reads release the GIL; one thread cannot keep up with the copy engine), then its copies are queued."""
        chunks = []
        for file, begin, nbytes, dest in work:
            flat = dest.reshape(-1).view(torch.uint8)
            for pos in range(0, nbytes, self.slot_bytes):
                n = min(self.slot_bytes, nbytes - pos)
                chunks.append((file, begin + pos, flat[pos:pos + n]))
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

