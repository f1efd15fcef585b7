"""Heal's output: each layer's trained parameters encoded as it finishes, parked on disk, then streamed into the
student's shards one tensor at a time.

Same tensor set as the student (plain dtypes, or quantized weights re-encoded in their own scheme): every
shard is rewritten with the same tensors in the same order, the index kept. With output_dtype "bf16",
quantized trained weights take the place of their codes as bf16 tensors, their scales dropped: shards are
written from a plan and config.json's quantization_config lists those modules as unquantized.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from statistics import fmean

import torch

from surgery.architectures import MoELayout
from surgery.io import Checkpoint, OutTensor, TensorInfo
from surgery.io.derived import DerivedCheckpoint
from surgery.io.quantization import scheme_for
from surgery.io.requantize import Encoded, unquantized_config
from surgery.refine.heal.export import encode_layer
from surgery.refine.heal.pairing import Pairing
from surgery.refine.heal.spill import Spill

_LAYER = re.compile(r"layers\.(\d+)\.")


class LayerWriter:
    """Encodes a layer's trained parameters (surgery.refine.heal.export.encode_layer) into the spill and keeps
    what the record needs: the re-quantization error per tensor and the modules written unquantized."""

    def __init__(self, ckpt: Checkpoint, layout: MoELayout, spill: Spill, output_dtype: str | None):
        self.ckpt, self.layout, self.spill, self.output_dtype = ckpt, layout, spill, output_dtype
        self.errors: dict[str, float] = {}
        self.memory_modules: list[str] = []
        self.disk_modules: list[str] = []

    def put(self, group: str, params: dict[str, torch.Tensor]) -> None:
        encoded = encode_layer(self.ckpt, self.layout, params, self.output_dtype)
        self.spill.put_encoded(group, encoded.tensors)
        self.errors.update(encoded.errors)
        self.memory_modules = list(dict.fromkeys(self.memory_modules + encoded.memory_modules))
        self.disk_modules = list(dict.fromkeys(self.disk_modules + encoded.disk_modules))

    @staticmethod
    def by_layer(names: list[str]) -> dict[str, list[str]]:
        """Parameter names grouped by decoder layer (the local stage's groups); the rest in "other"."""
        groups: dict[str, list[str]] = {}
        for name in names:
            found = _LAYER.findall(name)
            groups.setdefault(found[-1] if found else "other", []).append(name)
        return groups


def _requantization(writer: LayerWriter) -> dict:
    errors = writer.errors
    worst = max(errors, key=errors.get)
    scheme = scheme_for(writer.ckpt)
    return {"scheme": scheme.name if scheme else None, "tensors": len(errors),
            "relative_error_max": errors[worst], "relative_error_mean": fmean(errors.values()), "worst_tensor": worst}


def _planned(ckpt: Checkpoint, encoded: dict[str, Encoded], spill: Spill) -> dict[str, list[OutTensor]]:
    """Each shard's tensors in source order: parked ones streamed from the spill (a replacement in the place
    of the first tensor it replaces), replaced companions dropped, the rest copied by byte range."""
    position = {e.replaces[0]: e for e in encoded.values() if e.replaces}
    dropped = {n for e in encoded.values() for n in e.replaces}
    per_shard: dict[str, list[OutTensor]] = {}
    for shard, f in ckpt.files.items():
        out = per_shard.setdefault(shard, [])
        for info in sorted(f.tensors.values(), key=lambda t: t.begin):
            new = position.get(info.name) or (encoded.get(info.name) if info.name not in dropped else None)
            if new is not None:
                out.append(OutTensor(new.name, new.dtype, new.shape, stream=lambda n=new.name: spill.read(n)))
            elif info.name not in dropped:
                out.append(OutTensor(info.name, info.dtype, info.shape, ranges=[(f, info.begin, info.end)]))
    return per_shard


def write_output(writer: LayerWriter, out: DerivedCheckpoint, pairing: Pairing, record: dict) -> None:
    """The student with its parked tensors in place; pruning.json gains `heal` (with the re-quantization
    error when weights were re-encoded, the modules left unquantized with output_dtype)."""
    ckpt, spill = pairing.student, writer.spill
    encoded = spill.encoded
    record["tensors_written"] = sorted(encoded)
    if writer.errors:
        record["requantization"] = _requantization(writer)
    config = None
    if not any(e.replaces for e in encoded.values()):
        def produce(info: TensorInfo) -> Iterator[bytes] | None:
            return spill.read(info.name) if info.name in encoded else None

        out.replace_tensors(ckpt, produce)
    else:
        out.write_shards(ckpt, _planned(ckpt, encoded, spill))
        config, record["unquantized_modules"] = unquantized_config(ckpt.config, scheme_for(ckpt),
                                                                   writer.memory_modules, writer.disk_modules)
    if writer.output_dtype:
        record["output_dtype"] = writer.output_dtype
    out.finish(ckpt, {**pairing.record, "heal": record}, config=config)
