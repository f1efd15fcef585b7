"""Plan → new checkpoint: copy, drop or slice every tensor at the byte level, never loading the model.

Per-expert tensors of kept experts are copied whole under new ids 0..k-1; fused tensors and
router rows are sliced along the expert axis by copying the byte ranges of the kept slabs.
Dtypes are never converted, so bf16, fp8 with scales and MXFP4 blocks pass through bit-exact.
"""

from __future__ import annotations

from pathlib import Path

from surgery.architectures import MoELayout, check_shapes, resolve
from surgery.errors import PlanError, UserError
from surgery.io import Checkpoint, OutTensor, TensorInfo, nbytes, provenance
from surgery.io.derived import DerivedCheckpoint, as_output
from surgery.io.safetensors_file import SafetensorsFile
from surgery.plan import Plan
from surgery.rewrite.config import rewrite_config


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


def layout_record(layout: MoELayout, counts: dict[int, int]) -> dict:
    """pruning.json's description of the result: model type, expert counts before and after, layouts."""
    return {
        "model_type": layout.spec.model_type,
        "num_experts_before": layout.num_experts,
        "num_experts_after": max(counts.values()),
        "experts_per_layer": {str(k): v for k, v in counts.items()},
        "layout": {str(k): v.layout for k, v in layout.layers.items()},
    }


def source_layout(ckpt: Checkpoint, error: type[UserError] = PlanError) -> MoELayout:
    """The checkpoint's MoE layout, refused when its tensors disagree with its config."""
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    problems = check_shapes(layout, {n: ckpt.info(n).shape for n in ckpt.names()})
    if problems:
        raise error(f"{ckpt.dir}: source checkpoint disagrees with its config: {problems[0]}")
    return layout


def _check_quantized(ckpt: Checkpoint) -> None:
    """surgery.io.quantization.check_quantized on quantized checkpoints only: it needs numpy, which a byte
    copy of an unquantized checkpoint never imports."""
    text = ckpt.config.get("text_config")
    declared = "quantization_config" in ckpt.config or (isinstance(text, dict) and "quantization_config" in text)
    if not declared and not any(n.endswith(("_blocks", ".weight_packed")) or ckpt.info(n).dtype.startswith("F8_")
                                for n in ckpt.names()):
        return
    from surgery.io.quantization import check_quantized

    check_quantized(ckpt)


def rewrite_checkpoint(
    model_dir: str | Path,
    plan: Plan,
    out_dir: str | Path | DerivedCheckpoint,
    *,
    allow_nonuniform: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    hash_shards: bool = False,
) -> Path:
    """Write the checkpoint keeping the experts of `plan` to `out_dir` atomically; returns `out_dir`.

    The plan is validated against the checkpoint (errors name `plan.label`) and recorded in pruning.json.
    """
    with Checkpoint(model_dir) as ckpt:
        layout = source_layout(ckpt)
        _check_quantized(ckpt)  # scales cut with their weights must be there, with the shapes the scheme gives
        chosen = plan.validate(layout)
        counts = {layer: len(chosen.keep.get(layer, range(layout.num_experts))) for layer in layout.layers}
        uniform = len(set(counts.values())) == 1
        if not uniform and not allow_nonuniform:
            raise PlanError(
                f"{plan.label}: keeps {sorted(set(counts.values()))} experts in different MoE layers; config.json "
                "holds one expert count, so transformers cannot load this (pass --allow-nonuniform for runtimes that can)"
            )
        out, keep = as_output(out_dir, overwrite, [ckpt.dir]), chosen.keep
        id_maps = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in keep.items()}
        config = rewrite_config(ckpt.config, layout, max(counts.values()), id_maps, None if uniform else counts)
        record = {
            **layout_record(layout, counts),
            "expert_map": {str(layer): list(ids) for layer, ids in sorted(keep.items())},
            "plan": chosen.to_json(),
        }
        with out:
            hashes = out.write_shards(ckpt, plan_tensors(ckpt, layout, keep), hash_shards=hash_shards,
                                      progress=progress)
            out.finish(ckpt, {**provenance.header(provenance.source(ckpt, hashes)), **record}, config)
    return out.out_dir
