"""Plan → new checkpoint: copy, drop or slice every tensor at the byte level, never loading the model.

Per-expert tensors of kept experts are copied whole under new ids 0..k-1; fused tensors and
router rows are sliced along the expert axis by copying the byte ranges of the kept slabs.
Dtypes are never converted, so bf16, fp8 with scales and MXFP4 blocks pass through bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from surgery import __version__
from surgery.architectures import MoELayout, check_shapes, resolve
from surgery.errors import PlanError
from surgery.plan.document import complete_plan
from surgery.rewrite.config import rewrite_config
from surgery.io import (
    INDEX_NAME, Checkpoint, OutTensor, TensorInfo, atomic_output_dir, nbytes, write_safetensors,
    write_safetensors_hashing,
)
from surgery.io.safetensors_file import SafetensorsFile

_SHARD_RE = re.compile(r"^(?P<stem>.*?)(?P<idx>\d+)-of-(?P<total>\d+)\.safetensors$")
HASH_CHUNK = 16 * 1024 * 1024


def _slice_ranges(src: SafetensorsFile, info: TensorInfo, axis: int, kept: list[int]) -> tuple[tuple[int, ...], list]:
    """Byte ranges selecting `kept` along `axis`; consecutive slabs are merged into one range."""
    shape = info.shape
    outer = 1
    for d in shape[:axis]:
        outer *= d
    try:
        inner = nbytes(info.dtype, shape[axis + 1:])
    except ValueError:
        raise PlanError(f"{src.path}: {info.name} ({info.dtype}) slabs along axis {axis} are not whole bytes") from None
    axis_len = shape[axis]
    ranges: list[tuple[SafetensorsFile, int, int]] = []
    for o in range(outer):
        base = info.begin + o * axis_len * inner
        for i in kept:
            b, e = base + i * inner, base + (i + 1) * inner
            if ranges and ranges[-1][2] == b:
                ranges[-1] = (src, ranges[-1][1], e)
            else:
                ranges.append((src, b, e))
    new_shape = shape[:axis] + (len(kept),) + shape[axis + 1:]
    return new_shape, ranges


def plan_tensors(ckpt: Checkpoint, layout: MoELayout, keep: dict[int, list[int]]) -> dict[str, list[OutTensor]]:
    """For each source shard (in order), the output tensors it contributes."""
    maps = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in keep.items()}
    out: dict[str, list[OutTensor]] = {}
    for shard, f in ckpt.files.items():
        tensors: list[OutTensor] = []
        for info in sorted(f.tensors.values(), key=lambda t: t.begin):
            owner = layout.owner.get(info.name)
            layer = owner[0] if owner else None
            if owner is None or layer not in keep:
                tensors.append(OutTensor(info.name, info.dtype, info.shape, [(f, info.begin, info.end)]))
                continue
            _, role, arg = owner
            if role == "expert":
                if arg in maps[layer]:
                    entry = layout.layers[layer]
                    prefix = f"{entry.prefix}.experts.{arg}."
                    new_name = f"{entry.prefix}.experts.{maps[layer][arg]}." + info.name[len(prefix):]
                    tensors.append(OutTensor(new_name, info.dtype, info.shape, [(f, info.begin, info.end)]))
            else:
                shape, ranges = _slice_ranges(f, info, arg, keep[layer])
                tensors.append(OutTensor(info.name, info.dtype, shape, ranges))
        out[shard] = tensors
    return out


def _output_names(shards: list[str], nonempty: list[str]) -> dict[str, str]:
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


def _known_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """Content hashes that cost nothing: in the Hugging Face cache each shard links to a blob named by its sha256."""
    known = {}
    for shard in ckpt.shard_names:
        target = (ckpt.dir / shard).resolve().name
        if (ckpt.dir / shard).is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target):
            known[shard] = target
    return known if len(known) == len(ckpt.shard_names) else {}


def _header_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 of each shard's header (every tensor's name, dtype, shape and offsets): cheap structural identity."""
    out = {}
    for shard, f in ckpt.files.items():
        (hlen,) = struct.unpack("<Q", f.read_range(0, 8))
        out[shard] = hashlib.sha256(f.read_range(0, 8 + hlen)).hexdigest()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def rewrite_checkpoint(
    model_dir: str | Path,
    keep: dict[int, list[int]],
    out_dir: str | Path,
    *,
    allow_nonuniform: bool = False,
    overwrite: bool = False,
    plan_doc: dict | None = None,
    plan_source: str = "plan",
    progress: bool = False,
    hash_shards: bool = False,
) -> Path:
    """Write the pruned checkpoint to `out_dir` atomically; returns `out_dir`."""
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    problems = check_shapes(layout, {n: ckpt.info(n).shape for n in ckpt.names()})
    if problems:
        raise PlanError(f"{ckpt.dir}: source checkpoint disagrees with its config: {problems[0]}")
    keep = complete_plan(layout, keep, plan_source)
    counts = {layer: len(keep.get(layer, range(layout.num_experts))) for layer in layout.layers}
    uniform = len(set(counts.values())) == 1
    if not uniform and not allow_nonuniform:
        raise PlanError(
            f"{plan_source}: keeps {sorted(set(counts.values()))} experts in different MoE layers; config.json holds one "
            "expert count, so transformers cannot load this (pass --allow-nonuniform for runtimes that can)"
        )
    out_dir = Path(out_dir)
    if out_dir.resolve() == ckpt.dir.resolve():
        raise PlanError(f"{out_dir}: output folder must differ from the input checkpoint")
    per_shard = plan_tensors(ckpt, layout, keep)
    new_count = max(counts.values())
    id_maps = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in keep.items()}
    config = rewrite_config(ckpt.config, layout, new_count, id_maps, None if uniform else counts)
    record = {
        "model_type": layout.spec.model_type,
        "num_experts_before": layout.num_experts,
        "num_experts_after": new_count,
        "experts_per_layer": {str(k): v for k, v in counts.items()},
        "layout": {str(k): v.layout for k, v in layout.layers.items()},
        "expert_map": {str(layer): ids for layer, ids in sorted(keep.items())},
        "plan": plan_doc if plan_doc is not None else {"keep": {str(k): v for k, v in keep.items()}},
    }
    write_checkpoint(ckpt, per_shard, config, record, out_dir, overwrite=overwrite, progress=progress,
                     hash_shards=hash_shards)
    ckpt.close()
    return out_dir


def write_checkpoint(
    ckpt: Checkpoint,
    per_shard: dict[str, list[OutTensor]],
    config: dict,
    record: dict,
    out_dir: Path,
    *,
    overwrite: bool,
    progress: bool,
    hash_shards: bool,
) -> None:
    """Write the planned shards, index, config.json, other files and pruning.json (tool, source, then
    `record`) atomically; shared by the plain rewrite and the novice writer."""
    nonempty = [s for s in ckpt.shard_names if per_shard[s]]
    names = _output_names(ckpt.shard_names, nonempty)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        bar = tqdm(total=sum(t.nbytes for ts in per_shard.values() for t in ts), unit="B", unit_scale=True,
                   desc="Writing shards", disable=not progress)

        def write_one(shard: str) -> tuple[int, str | None]:
            """One output shard (and the source shard's sha256): shards are independent, so they run in parallel."""
            tensors = per_shard[shard]
            if not tensors:
                return 0, _sha256(ckpt.dir / shard) if hash_shards else None
            meta = ckpt.files[shard].metadata or {"format": "pt"}
            if hash_shards and all(t.data is None for t in tensors):
                size, digest = write_safetensors_hashing(tmp / names[shard], tensors, meta, ckpt.files[shard])
            else:  # new in-memory tensors (novice values) cannot ride on the single hashing read
                size = write_safetensors(tmp / names[shard], tensors, meta)
                digest = _sha256(ckpt.dir / shard) if hash_shards else None
            bar.update(sum(t.nbytes for t in tensors))
            return size, digest

        with ThreadPoolExecutor(max_workers=min(len(ckpt.shard_names), os.cpu_count() or 1, 8)) as pool:
            results = dict(zip(ckpt.shard_names, pool.map(write_one, ckpt.shard_names)))
        bar.close()
        hashes = {s: d for s, (_, d) in results.items() if d is not None} or _known_sha256(ckpt)
        total_size = sum(size for size, _ in results.values())
        weight_map = {t.name: names[s] for s in nonempty for t in per_shard[s]}
        total_params = sum(math.prod(t.shape) for s in nonempty for t in per_shard[s])
        if ckpt.index is not None or len(nonempty) > 1:
            index = dict(ckpt.index or {})
            metadata = dict(index.get("metadata") or {})
            metadata["total_size"] = total_size
            if "total_parameters" in metadata:
                metadata["total_parameters"] = total_params
            index["metadata"] = metadata
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_other_files(ckpt, tmp)
        provenance = {
            "tool": "moe-surgery",
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(ckpt.dir.resolve()), "shards_sha256": hashes or None,
                       "shards_header_sha256": _header_sha256(ckpt)},
            **record,
        }
        (tmp / "pruning.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _copy_other_files(ckpt: Checkpoint, dest: Path) -> None:
    """Copy tokenizer, generation config, chat template, custom code, README...; skip weight files."""
    skip = set(ckpt.shard_names) | {INDEX_NAME, "config.json", "pruning.json"}
    for src in ckpt.dir.iterdir():
        if src.name in skip or src.name.startswith("."):
            continue
        if src.is_dir():
            shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pth"))
        elif src.suffix not in (".safetensors", ".bin", ".pth"):  # other weight sets would carry unpruned experts
            shutil.copy2(src, dest / src.name)
