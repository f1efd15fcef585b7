"""Re-open a checkpoint and check that headers, index and expert shapes agree with config.json."""

from __future__ import annotations

import os
from pathlib import Path

from surgery.architectures import ArchitectureError, MoELayout, check_shapes, resolve
from surgery.io import Checkpoint
from surgery.io.paths import contained, show
from surgery.refine.sparsify import check_nm


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems found (empty when the checkpoint is consistent); unreadable input raises CheckpointError."""
    ckpt = Checkpoint(path)
    problems: list[str] = []
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    per_layer = _per_layer_counts(layout, str(ckpt.config_path))
    shapes = {n: ckpt.info(n).shape for n in ckpt.names()}
    if per_layer:
        for layer, count in per_layer.items():
            sub = resolve({**ckpt.config, **_with_count(ckpt.config, layout, count)}, ckpt.names())
            sub.layers = {layer: sub.layers[layer]}
            problems += check_shapes(sub, shapes)
    else:
        problems += check_shapes(layout, shapes)
    if ckpt.index is not None:
        metadata = ckpt.index.get("metadata")
        declared = metadata.get("total_size") if isinstance(metadata, dict) else None
        actual = sum(ckpt.info(n).nbytes for n in ckpt.names())
        if declared is not None and declared != actual:
            problems.append(f"{ckpt.dir}/model.safetensors.index.json: total_size {declared!r} != {actual} bytes of tensors")
    ckpt.close()
    try:
        problems += check_nm(path)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        problems.append(f"{Path(path) / 'pruning.json'}: malformed sparsity section ({type(e).__name__}: {e})")
    problems += _links_out(Path(path))
    return problems


def _links_out(folder: Path) -> list[str]:
    """Files of the folder that resolve outside it (and are no Hugging Face cache blob): `push` would upload
    what they point at."""
    problems = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [*dirs, *files]:
            entry = Path(root) / name
            if not name.startswith(".") and not contained(folder, entry):
                target = show(os.path.realpath(entry))
                problems.append(f"{show(entry)}: a symbolic link to {target}, outside the folder")
    return problems


def _with_count(config: dict, layout, count: int) -> dict:
    """A config override setting the expert count, for checking one layer of a non-uniform checkpoint."""
    if layout.spec.config_path:
        sub = dict(config[layout.spec.config_path[0]])
        sub[layout.spec.expert_keys[0]] = count
        return {layout.spec.config_path[0]: sub}
    return {layout.spec.expert_keys[0]: count}


def _per_layer_counts(layout: MoELayout, where: str) -> dict[int, int]:
    """`moe_surgery_experts_per_layer` ({"<layer>": count}, non-uniform checkpoints), checked: it is input too."""
    raw = layout.config.get("moe_surgery_experts_per_layer")
    if not raw:
        return {}
    counts: dict[int, int] = {}
    for key, count in raw.items() if isinstance(raw, dict) else [(None, None)]:
        layer = int(key) if isinstance(key, str) and key.isdigit() else None
        if layer not in layout.layers or isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ArchitectureError(f"{where}: moe_surgery_experts_per_layer must map MoE layer indices to expert "
                                    f"counts; {key!r}: {count!r} is not one")
        counts[layer] = count
    return counts
