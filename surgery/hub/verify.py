"""Re-open a checkpoint and check that headers, index and expert shapes agree with config.json."""

from __future__ import annotations

from pathlib import Path

from surgery.architectures import check_shapes, resolve
from surgery.io import Checkpoint
from surgery.refine.sparsify import check_nm


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems found (empty when the checkpoint is consistent); unreadable input raises CheckpointError."""
    ckpt = Checkpoint(path)
    problems: list[str] = []
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    per_layer = layout.config.get("moe_surgery_experts_per_layer")
    shapes = {n: ckpt.info(n).shape for n in ckpt.names()}
    if per_layer:
        for layer, count in per_layer.items():
            sub = resolve({**ckpt.config, **_with_count(ckpt.config, layout, count)}, ckpt.names())
            sub.layers = {int(layer): sub.layers[int(layer)]}
            problems += check_shapes(sub, shapes)
    else:
        problems += check_shapes(layout, shapes)
    if ckpt.index is not None:
        declared = (ckpt.index.get("metadata") or {}).get("total_size")
        actual = sum(ckpt.info(n).nbytes for n in ckpt.names())
        if declared is not None and int(declared) != actual:
            problems.append(f"{ckpt.dir}/model.safetensors.index.json: total_size {declared} != {actual} bytes of tensors")
    ckpt.close()
    problems += check_nm(path)
    return problems


def _with_count(config: dict, layout, count: int) -> dict:
    """A config override setting the expert count, for checking one layer of a non-uniform checkpoint."""
    if layout.spec.config_path:
        sub = dict(config[layout.spec.config_path[0]])
        sub[layout.spec.expert_keys[0]] = count
        return {layout.spec.config_path[0]: sub}
    return {layout.spec.expert_keys[0]: count}
