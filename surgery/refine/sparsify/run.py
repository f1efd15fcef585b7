"""`sparsify`: a copy of a checkpoint with the least important weights of every expert matrix zeroed.

The checkpoint is streamed: other tensors are copied by byte range, and each expert weight (or
each expert's slab of a fused tensor) is read, masked and written before the next is read.
Quantized checkpoints keep their format: the same tensors, dtypes, shapes and scales, with the pruned
values' codes set to zero (surgery.refine.sparsify.masks.mask_codes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from stats_formats import StatsFile

from surgery.architectures import MoELayout, resolve
from surgery.io import Checkpoint, TensorInfo, provenance
from surgery.io.derived import DerivedCheckpoint, as_output
from surgery.io.quantization import check_quantized, dequantize, values_shape
from surgery.refine.sparsify.masks import (
    METHODS, SparsifyError, check_sparsity, mask_codes, mask_matrix, parse_pattern, slabs,
)
from surgery.refine.sparsify.targets import ChannelNorms, Target, find_targets, stats_expert_map


def _open_stats(stats_path: str | Path | None, method: str) -> StatsFile | None:
    if method not in METHODS:
        raise SparsifyError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "magnitude":
        if stats_path is not None:
            raise SparsifyError("magnitude pruning reads no statistics file; drop --stats")
        return None
    if stats_path is None:
        raise SparsifyError(f"method {method} needs a statistics file from `collect` (--stats)")
    return StatsFile(stats_path)


def _layers(layout: MoELayout, stats: StatsFile | None) -> list[int]:
    """MoE layers to sparsify: all of them for magnitude, those with statistics otherwise."""
    if stats is None:
        return list(layout.layers)
    missing = [layer for layer in stats.layers if layer not in layout.layers]
    if missing:
        raise SparsifyError(f"{stats.label}: statistics for layers {missing}, which are not MoE layers of this model")
    return sorted(stats.layers)


def _provenance(ckpt: Checkpoint, layout: MoELayout) -> dict:
    """pruning.json of the input (expert removal keeps its record) or a fresh header."""
    return provenance.read(ckpt.dir) or {**provenance.header({"path": str(ckpt.dir.resolve())}),
                                         "model_type": layout.spec.model_type}


def sparsify_checkpoint(
    model_dir: str | Path,
    stats_path: str | Path | None,
    out_dir: str | Path | DerivedCheckpoint,
    *,
    sparsity: float | None,
    pattern: str = "unstructured",
    method: str = "moe-pruner",
    include_shared: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write a copy of `model_dir` with expert weights sparsified; returns pruning.json's sparsity section.

    Holds one expert matrix (one slab of a fused tensor) in memory at a time. Statistics must
    come from this model or, via its pruning.json, from the model its experts were removed from.
    """
    sparsity = check_sparsity(sparsity, pattern)
    stats = _open_stats(stats_path, method)
    with Checkpoint(model_dir) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        check_quantized(ckpt)  # every scale there and well-shaped before the output is opened
        out = as_output(out_dir, overwrite, [ckpt.dir])
        expert_map = stats_expert_map(ckpt, layout, stats) if stats is not None else {}
        layers = _layers(layout, stats)
        targets = find_targets(ckpt, layout, layers, include_shared)
        norms = ChannelNorms(stats, method, expert_map)
        zeros: dict[str, int] = {}

        def produce(info: TensorInfo) -> Iterator[bytes] | None:
            target = targets.get(info.name)
            if target is None:
                return None
            return _masked_pieces(ckpt, info, target, norms, sparsity, pattern, zeros)

        bar = tqdm(total=len(targets), unit="tensor", desc="Sparsifying", disable=not progress)
        with bar, out:  # the bar ends its line even on an error, so `Error:` starts a line of its own
            out.replace_tensors(ckpt, produce, lambda shard: bar.update(sum(1 for n in ckpt.files[shard].tensors
                                                                            if n in targets)))
            section = _section(ckpt, targets, norms, zeros, stats, method=method, pattern=pattern,
                               sparsity=sparsity, include_shared=include_shared, layers=layers)
            out.finish(ckpt, {**_provenance(ckpt, layout), "sparsity": section})
    return section


def _masked_pieces(ckpt: Checkpoint, info: TensorInfo, target: Target, norms: ChannelNorms, sparsity: float,
                   pattern: str, zeros: dict[str, int]) -> Iterator[bytes]:
    """Masked bytes of one target tensor, one expert at a time; counts its zeros into `zeros`.
    Quantized targets are scored on each slab's dequantized values, [out, in]."""
    count = info.shape[0] if target.fused else 1
    vshape = values_shape(ckpt, info.name)
    shape = vshape[1:] if target.fused else vshape
    axis = target.input_axis - 1 if target.fused else target.input_axis
    zeros[info.name] = 0
    for i, raw in enumerate(slabs(ckpt.file_of(info.name), info, count)):
        index = i if target.fused else target.expert
        norm = norms.get(target, index)
        if norm is not None and norm.shape[0] != shape[axis]:
            raise SparsifyError(f"{norms.stats.label}: layer {target.layer} statistics have {norm.shape[0]} "
                                f"channels, {info.name} has {shape[axis]} inputs")
        if target.form is None:
            piece, n = mask_matrix(raw, info.dtype, shape, axis, norm, sparsity, pattern)
        else:
            values = dequantize(ckpt, info.name, i if target.fused else None)
            piece, n = mask_codes(raw, target.form, values, norm, sparsity, pattern)
        zeros[info.name] += n
        yield piece


def _section(ckpt: Checkpoint, targets: dict[str, Target], norms: ChannelNorms, zeros: dict[str, int],
             stats: StatsFile | None, **options) -> dict:
    sizes = {name: math.prod(values_shape(ckpt, name)) for name in targets}
    return {
        **options,
        "comparison_group": "output row",
        "created": provenance.now(),
        "stats": None if stats is None else {"path": str(stats.path.resolve()), "sha256": stats.sha256},
        "stats_expert_ids": "pruning.json expert_map" if norms.expert_map else "same as checkpoint",
        "unrouted_experts_magnitude": {str(k): sorted(v) for k, v in sorted(norms.unrouted.items())},
        "achieved": sum(zeros.values()) / max(1, sum(sizes.values())),
        "tensors": {
            name: {"achieved": zeros[name] / sizes[name], "input_axis": t.input_axis, "score": norms.score_name(t)}
            for name, t in sorted(targets.items())
        },
    }


def check_nm(model_dir: str | Path) -> list[str]:
    """Tensors named in pruning.json's sparsity section that break its N:M pattern (empty if none apply)."""
    section = provenance.read(model_dir).get("sparsity")
    nm = parse_pattern(section["pattern"]) if section else None
    if nm is None:
        return []
    with Checkpoint(model_dir) as ckpt:
        return [p for name, entry in section["tensors"].items() if (p := _nm_problem(ckpt, name, entry, nm, section))]


def _nm_problem(ckpt: Checkpoint, name: str, entry: dict, nm: tuple[int, int], section: dict) -> str | None:
    """Groups breaking N:M in one tensor, read one expert at a time (quantized: the dequantized values)."""
    n, m = nm
    if name not in ckpt.weight_map:
        return f"{name}: listed in {provenance.PRUNING_JSON} but not in the checkpoint"
    vshape = values_shape(ckpt, name)
    bad = groups = 0
    fused = len(vshape) == 3
    shape = vshape[-2:]
    axis = entry["input_axis"] - (len(vshape) - 2)
    if shape[axis] % m:
        return f"{name}: {shape[axis]} inputs are not a multiple of {m}"
    for i in range(vshape[0] if fused else 1):
        values = np.moveaxis(dequantize(ckpt, name, i if fused else None), axis, -1)
        nonzero = np.count_nonzero(values.reshape(-1, m) != 0, axis=-1)
        bad += int(np.count_nonzero(nonzero > n))
        groups += nonzero.size
    if bad:
        return (f"{name}: {bad} of {groups} groups of {m} consecutive inputs hold more than {n} non-zeros "
                f"(pattern {section['pattern']})")
    return None
