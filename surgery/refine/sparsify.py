"""Weight sparsity inside experts: zero the least important weights of every expert matrix.

Scores follow MoE-Pruner (arXiv 2410.12013): S_rc = |W_rc| * sqrt(sum_t r g^2 x_c^2), the input
channel's norm over the tokens routed to the expert, weighted by the router's gate; Wanda drops
the gate (sum_t r x_c^2); magnitude uses |W_rc| alone. The comparison group is each output row,
so every expert matrix gets the same sparsity. N:M keeps the N best of every M consecutive inputs.

The checkpoint is streamed: other tensors are copied by byte range, and each expert weight (or
each expert's slab of a fused tensor) is read, masked and written before the next is read. Kept
weights keep their exact bits (masking zeroes the stored integers), so bf16 stays bit-exact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from stats_formats import StatsFile

from surgery import __version__
from surgery.architectures import MoELayout, resolve
from surgery.errors import UserError
from surgery.architectures.expert_math import FUSED_DOWN, FUSED_GATE_UP, PROJECTION_ROLE, ROLE_PATTERNS, SHARED_RE
from surgery.io.identity import check_stats_match
from surgery.io import INDEX_NAME, Checkpoint, SafetensorsFile, TensorInfo, atomic_output_dir, decode, rewrite_shard
from surgery.rewrite.experts import _copy_other_files

METHODS = ("moe-pruner", "wanda", "magnitude")
# Statistics field per method and input side: "in" feeds gate/up (size H), "inter" feeds down (size I).
NORM_FIELDS = {
    "moe-pruner": {"in": "in_gsq_sum", "inter": "inter_gsq_sum"},
    "wanda": {"in": "in_sq_sum", "inter": "inter_sq_sum"},
}
# Float dtypes and the unsigned integer of the same width: zeroing those integers zeroes the weight.
BITS_DTYPES = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}
ROW_BLOCK = 1024  # rows scored at once: bounds the float32 workspace for very wide experts
PRUNING_JSON = "pruning.json"


class SparsifyError(UserError):
    """Bad sparsify input: options, statistics that do not fit, or weights that cannot be masked."""


# ---------------------------------------------------------------------------------------------
# Masks


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) from "N:M" with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise SparsifyError(f"pattern {pattern!r}: use unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)")
    return int(m[1]), int(m[2])


def check_sparsity(sparsity: float | None, pattern: str) -> float:
    """The sparsity to apply: N:M fixes it at 1 - N/M, so a different value is a contradiction."""
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
            raise SparsifyError(f"pattern {pattern} means sparsity {implied:g}, not {sparsity:g}")
        return implied
    if sparsity is None or not 0 <= sparsity < 1:
        raise SparsifyError(f"unstructured sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def _prune_lowest(score: np.ndarray, k: int) -> np.ndarray:
    """True for the k lowest scores along the last axis; ties go to the lower index (as a stable sort).

    A partition finds each group's k-th score in linear time; a full sort of every row would
    dominate the run time on large experts.
    """
    if k == 0:
        return np.zeros(score.shape, dtype=bool)
    kth = np.partition(score, k - 1, axis=-1)[..., k - 1: k]
    below = score < kth
    tie = score == kth
    room = k - below.sum(axis=-1, keepdims=True)
    return below | (tie & (np.cumsum(tie, axis=-1) <= room))


def row_mask(weight: np.ndarray, channel_norm: np.ndarray | None, sparsity: float, pattern: str) -> np.ndarray:
    """Keep-mask (True = weight survives) of a [out, in] matrix, scored |W| * channel_norm per output row.

    Unstructured prunes round(sparsity * in) weights of every row; N:M prunes M - N of every M
    consecutive inputs. channel_norm is None for magnitude pruning.
    """
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, pattern)
    rows, cols = weight.shape
    score = np.abs(weight.astype(np.float32, copy=False))
    if channel_norm is not None:
        if channel_norm.shape != (cols,):
            raise SparsifyError(f"channel norms have shape {list(channel_norm.shape)}, the matrix has {cols} inputs")
        score = score * channel_norm.astype(np.float32)[None, :]
    if nm is None:
        return ~_prune_lowest(score, math.floor(sparsity * cols + 0.5))
    n, m = nm
    if cols % m:
        raise SparsifyError(f"pattern {pattern}: {cols} inputs are not a multiple of {m}")
    return ~_prune_lowest(score.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def _mask_matrix(raw: bytes, dtype: str, shape: tuple[int, ...], input_axis: int, norm: np.ndarray | None,
                 sparsity: float, pattern: str) -> tuple[bytes, int]:
    """Masked bytes of one stored matrix (inputs on `input_axis`) and its number of zero weights."""
    bits = np.frombuffer(raw, dtype=BITS_DTYPES[dtype]).reshape(shape).copy()
    values = decode(raw, dtype, shape)
    if input_axis == 0:
        bits, values = bits.T, values.T
    for r0 in range(0, bits.shape[0], ROW_BLOCK):
        keep = row_mask(values[r0: r0 + ROW_BLOCK], norm, sparsity, pattern)
        bits[r0: r0 + ROW_BLOCK][~keep] = 0
    magnitude_bits = np.iinfo(bits.dtype).max >> 1  # every bit but the sign: ±0 both count as zero
    zeros = int(np.count_nonzero((bits & magnitude_bits) == 0))
    return (bits.T if input_axis == 0 else bits).tobytes(), zeros


# ---------------------------------------------------------------------------------------------
# Which tensors, and their channel norms


@dataclass(frozen=True)
class Target:
    """One stored weight to sparsify. Fused tensors hold one [out, in] or [in, out] slab per expert."""

    layer: int
    side: str  # "in": the input is the MoE block input x (gate/up); "inter": the expert's h (down)
    input_axis: int  # axis of the stored tensor that indexes input channels
    expert: int | None = None  # per-expert tensors; None for fused (slab i = expert i) and shared ones
    shared: bool = False

    @property
    def fused(self) -> bool:
        return self.expert is None and not self.shared


def _refuse_dtype(ckpt: Checkpoint, name: str) -> None:
    dtype = ckpt.info(name).dtype
    if dtype not in BITS_DTYPES:
        raise SparsifyError(f"{ckpt.file_of(name).path}: {name} is {dtype}; only bf16/fp16/fp32 expert weights can be "
                            "sparsified (dequantize FP8/MXFP4 checkpoints first)")


def _layer_targets(ckpt: Checkpoint, layout: MoELayout, layer: int) -> dict[str, Target]:
    entry = layout.layers[layer]
    out: dict[str, Target] = {}
    if entry.per_expert:
        for expert, names in entry.per_expert.items():
            found = {role: n for n in names for role, pat in ROLE_PATTERNS.items() if pat.search(n)}
            if set(found) != set(ROLE_PATTERNS):
                raise SparsifyError(f"{ckpt.dir}: layer {layer} expert {expert}: no float gate/up/down weights "
                                    f"among {names} (quantized experts cannot be sparsified)")
            for role, name in found.items():
                out[name] = Target(layer, "inter" if role == "down" else "in", 1, expert)
        return out
    gate_up = [n for n in entry.fused if FUSED_GATE_UP.search(n)]
    down = [n for n in entry.fused if FUSED_DOWN.search(n)]
    if len(gate_up) != 1 or len(down) != 1:
        raise SparsifyError(f"{ckpt.dir}: layer {layer}: no float fused expert weights among {entry.fused} "
                            "(quantized layouts such as MXFP4 cannot be sparsified)")
    input_axis = 2 if layout.spec.fused_orientation == "out_in" else 1
    out[gate_up[0]] = Target(layer, "in", input_axis)
    out[down[0]] = Target(layer, "inter", input_axis)
    return out


def find_targets(ckpt: Checkpoint, layout: MoELayout, layers: list[int], include_shared: bool) -> dict[str, Target]:
    """Routed expert weights of `layers` (and their shared experts' when asked), validated as maskable floats."""
    out: dict[str, Target] = {}
    for layer in layers:
        out.update(_layer_targets(ckpt, layout, layer))
    if include_shared:
        by_prefix = {layout.layers[layer].prefix: layer for layer in layers}
        for name in ckpt.names():
            m = SHARED_RE.search(name)
            layer = by_prefix.get(name[: m.start()]) if m else None
            if layer is not None:
                out[name] = Target(layer, "inter" if PROJECTION_ROLE[m[1]] == "down" else "in", 1, shared=True)
    for name in out:
        _refuse_dtype(ckpt, name)
    return out


class ChannelNorms:
    """sqrt of the per-channel sums for each expert, read from the statistics file one layer field at a time.

    Expert ids in the checkpoint map to statistics ids through `expert_map` (layer -> kept original
    ids) when the checkpoint had experts removed after the statistics were collected. Shared experts
    see every token, so their gate/up use the plain sums over all routed experts (each token counted
    top-k times: a constant factor, harmless inside a row); no statistic describes their down input.
    """

    def __init__(self, stats: StatsFile | None, method: str, expert_map: dict[int, list[int]]):
        self.stats, self.method, self.expert_map = stats, method, expert_map
        self.unrouted: dict[int, list[int]] = {}
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def _field(self, layer: int, field: str) -> np.ndarray:
        """[E, channels] sums; a few fields are cached (a layer's tensors mostly sit together in a shard)."""
        if (layer, field) not in self._cache:
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[layer, field] = np.asarray(self.stats.get(layer, field))
        return self._cache[layer, field]

    def score_name(self, target: Target) -> str:
        if self.stats is None or (target.shared and target.side == "inter"):
            return "magnitude"
        return "wanda" if target.shared else self.method

    def get(self, target: Target, expert: int | None) -> np.ndarray | None:
        """Channel norms for one matrix, or None for magnitude (also for experts never routed in calibration)."""
        score = self.score_name(target)
        if score == "magnitude":
            return None
        field = NORM_FIELDS[score][target.side]
        if target.shared:
            return np.sqrt(self._field(target.layer, field).sum(axis=0))
        ids = self.expert_map.get(target.layer)
        sums = self._field(target.layer, field)[ids[expert] if ids else expert]
        if not sums.any():
            self.unrouted.setdefault(target.layer, [])
            if expert not in self.unrouted[target.layer]:
                self.unrouted[target.layer].append(expert)
            return None
        return np.sqrt(sums)


# ---------------------------------------------------------------------------------------------
# Statistics that belong to this checkpoint, or to the one it was pruned from


def read_pruning_json(model_dir: Path) -> dict:
    path = model_dir / PRUNING_JSON
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SparsifyError(f"{path}: not a JSON object")
    return doc


def router_mismatch(ckpt: Checkpoint, layout: MoELayout, source: Checkpoint, keep: dict[int, list[int]]) -> str | None:
    """The first router tensor of `ckpt` that is not the kept rows of `source`'s, or None when all are.
    Byte equality: it tells the checkpoint an expert removal started from apart from a look-alike."""
    for layer, entry in layout.layers.items():
        for name, axis in entry.router.items():
            if name not in source.weight_map:
                return name
            info = source.info(name)
            ids = keep.get(layer, list(range(info.shape[axis])))
            rows = np.frombuffer(source.read_bytes(name), np.uint8).reshape(*info.shape[: axis + 1], -1)
            if np.take(rows, ids, axis=axis).tobytes() != ckpt.read_bytes(name):
                return name
    return None


def stats_expert_map(ckpt: Checkpoint, layout: MoELayout, stats: StatsFile) -> dict[int, list[int]]:
    """{} when the statistics were collected on this checkpoint; the keep-lists of pruning.json
    when they were collected on the model this checkpoint was pruned from (checked by router bytes)."""
    try:
        check_stats_match(ckpt.dir, stats)
        return {}
    except UserError:
        doc = read_pruning_json(ckpt.dir)
        source = (doc.get("source") or {}).get("path")
        if not doc.get("expert_map") or not source:
            raise
    try:
        check_stats_match(source, stats)
    except UserError:
        raise SparsifyError(f"{stats.label}: statistics were collected neither on {ckpt.dir} nor on {source}, "
                            "the model it was pruned from") from None
    keep = {int(layer): ids for layer, ids in doc["expert_map"].items()}
    src = Checkpoint(source)
    try:
        bad = router_mismatch(ckpt, layout, src, keep)
        if bad is not None:
            raise SparsifyError(f"{ckpt.dir}: {bad} is not the kept rows of {src.dir}'s (is {PRUNING_JSON} stale?)")
    finally:
        src.close()
    return keep


# ---------------------------------------------------------------------------------------------
# Streaming writer


def _slabs(f: SafetensorsFile, info: TensorInfo, count: int) -> Iterator[bytes]:
    """The tensor's bytes in `count` equal slabs along axis 0, one read each."""
    size = info.nbytes // count
    for i in range(count):
        yield f.read_range(info.begin + i * size, info.begin + (i + 1) * size)


# ---------------------------------------------------------------------------------------------
# The command


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
    doc = read_pruning_json(ckpt.dir)
    return doc or {
        "tool": "moe-surgery",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(ckpt.dir.resolve())},
        "model_type": layout.spec.model_type,
    }


def sparsify_checkpoint(
    model_dir: str | Path,
    stats_path: str | Path | None,
    out_dir: str | Path,
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
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names())
    out_dir = Path(out_dir)
    if out_dir.resolve() == ckpt.dir.resolve():
        raise SparsifyError(f"{out_dir}: output folder must differ from the input checkpoint")
    expert_map = stats_expert_map(ckpt, layout, stats) if stats is not None else {}
    layers = _layers(layout, stats)
    targets = find_targets(ckpt, layout, layers, include_shared)
    norms = ChannelNorms(stats, method, expert_map)
    zeros: dict[str, int] = {}

    def produce(info: TensorInfo) -> Iterator[bytes] | None:
        target = targets.get(info.name)
        if target is None:
            return None
        return _masked_pieces(ckpt.file_of(info.name), info, target, norms, sparsity, pattern, zeros)

    bar = tqdm(total=len(targets), unit="tensor", desc="Sparsifying", disable=not progress)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for shard, f in ckpt.files.items():
            rewrite_shard(tmp / shard, f, produce)
            bar.update(sum(1 for n in f.tensors if n in targets))
        for name in (INDEX_NAME, "config.json"):
            if (ckpt.dir / name).is_file():
                shutil.copy2(ckpt.dir / name, tmp / name)
        _copy_other_files(ckpt, tmp)
        section = _section(ckpt, targets, norms, zeros, stats, method=method, pattern=pattern, sparsity=sparsity,
                           include_shared=include_shared, layers=layers)
        doc = _provenance(ckpt, layout)
        doc["sparsity"] = section
        (tmp / PRUNING_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    bar.close()
    ckpt.close()
    return section


def _masked_pieces(f: SafetensorsFile, info: TensorInfo, target: Target, norms: ChannelNorms, sparsity: float,
                   pattern: str, zeros: dict[str, int]) -> Iterator[bytes]:
    """Masked bytes of one target tensor, one expert at a time; counts its zeros into `zeros`."""
    count = info.shape[0] if target.fused else 1
    shape = info.shape[1:] if target.fused else info.shape
    axis = target.input_axis - 1 if target.fused else target.input_axis
    zeros[info.name] = 0
    for i, raw in enumerate(_slabs(f, info, count)):
        norm = norms.get(target, i if target.fused else target.expert)
        if norm is not None and norm.shape[0] != shape[axis]:
            raise SparsifyError(f"{norms.stats.label}: layer {target.layer} statistics have {norm.shape[0]} "
                                f"channels, {info.name} has {shape[axis]} inputs")
        piece, n = _mask_matrix(raw, info.dtype, shape, axis, norm, sparsity, pattern)
        zeros[info.name] += n
        yield piece


def _section(ckpt: Checkpoint, targets: dict[str, Target], norms: ChannelNorms, zeros: dict[str, int],
             stats: StatsFile | None, **options) -> dict:
    sizes = {name: math.prod(ckpt.info(name).shape) for name in targets}
    return {
        **options,
        "comparison_group": "output row",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stats": None if stats is None else {"path": str(stats.path.resolve()), "sha256": stats.sha256},
        "stats_expert_ids": "pruning.json expert_map" if norms.expert_map else "same as checkpoint",
        "unrouted_experts_magnitude": {str(k): sorted(v) for k, v in sorted(norms.unrouted.items())},
        "achieved": sum(zeros.values()) / max(1, sum(sizes.values())),
        "tensors": {
            name: {"achieved": zeros[name] / sizes[name], "input_axis": t.input_axis, "score": norms.score_name(t)}
            for name, t in sorted(targets.items())
        },
    }


# ---------------------------------------------------------------------------------------------
# Verification


def check_nm(model_dir: str | Path) -> list[str]:
    """Tensors named in pruning.json's sparsity section that break its N:M pattern (empty if none apply)."""
    model_dir = Path(model_dir)
    section = read_pruning_json(model_dir).get("sparsity")
    nm = parse_pattern(section["pattern"]) if section else None
    if nm is None:
        return []
    n, m = nm
    ckpt = Checkpoint(model_dir)
    problems = []
    for name, entry in section["tensors"].items():
        if name not in ckpt.weight_map:
            problems.append(f"{name}: listed in {PRUNING_JSON} but not in the checkpoint")
            continue
        info = ckpt.info(name)
        bad = groups = 0
        count = info.shape[0] if len(info.shape) == 3 else 1
        shape = info.shape[-2:]
        axis = entry["input_axis"] - (len(info.shape) - 2)
        if shape[axis] % m:
            problems.append(f"{name}: {shape[axis]} inputs are not a multiple of {m}")
            continue
        for raw in _slabs(ckpt.file_of(name), info, count):
            values = np.moveaxis(decode(raw, info.dtype, shape), axis, -1)
            nonzero = np.count_nonzero(values.reshape(-1, m) != 0, axis=-1)
            bad += int(np.count_nonzero(nonzero > n))
            groups += nonzero.size
        if bad:
            problems.append(f"{name}: {bad} of {groups} groups of {m} consecutive inputs hold more than {n} non-zeros "
                            f"(pattern {section['pattern']})")
    ckpt.close()
    return problems
