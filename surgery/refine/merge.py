"""`prune --merge` and `prune --refit`: the merged checkpoint, and the layer-local refit of heal, written
through the one derived-checkpoint writer.

A merge is written in two steps: the byte-level rewrite keeps each group's representative (its router
row, its place), then the representatives' expert tensors are replaced by the merged values, mapped
onto the on-disk layout (per-expert or fused) by heal's exporter. The result has the plain layout with
fewer experts and loads in transformers unchanged; pruning.json gains a `merge` record.

`--refit` is heal's layer-local stage (surgery.refine.heal, `--kd-steps 0`) run against the source
checkpoint with a small budget; pruning.json gains heal's record. The intermediate checkpoints live in
a work folder that the caller removes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from stats_formats import StatsFile
from surgery.architectures.expert_math import DOWN, GATE_UP
from surgery.io import Checkpoint, TensorInfo, provenance
from surgery.io.derived import DerivedCheckpoint
from surgery.io.expert_weights import read_expert
from surgery.io.identity import check_stats_match
from surgery.plan import Plan
from surgery.refine.heal.export import disk_tensors, to_bytes
from surgery.rewrite.experts import rewrite_checkpoint, source_layout
from surgery.rewrite.merge import merge_layer, merge_record
from surgery.rewrite.merge_groups import Groups, groups_for


@dataclass(frozen=True)
class RefitOptions:
    """heal's layer-local stage sized for a CPU: at most `tokens` of `data` (all of it when shorter; one sequence
    in 16 held out to pick each layer's best step), `steps` Adam steps per MoE layer."""

    data: tuple[str, ...] = ()
    tokens: int = 262144
    steps: int = 600
    lr: float = 3e-4
    seq_len: int = 512
    batch_size: int = 8
    device: str | None = None
    seed: int = 0


def merged_plan(plan: Plan, method: str, stats: StatsFile) -> tuple[Plan, dict[int, Groups]]:
    """The plan keeping each group's representative, and the groups (see surgery.rewrite.merge_groups)."""
    groups = groups_for(method, dict(plan.keep), stats.get, lambda name: name in stats.optional_fields,
                        str(stats.path))
    keep = {layer: [g[0] for g in gs] for layer, gs in groups.items()}
    return replace(plan, keep=keep, document=None), groups


def merge_values(model_dir: Path, student: Checkpoint, method: str, groups: dict[int, Groups],
                 stats: StatsFile) -> dict[str, torch.Tensor]:
    """{on-disk tensor of `student`: merged value} for every merged layer, one layer in memory at a time."""
    layout = source_layout(student)
    values: dict[str, torch.Tensor] = {}
    with Checkpoint(model_dir) as src:
        src_layout = source_layout(src)
        for layer, gs in groups.items():
            gate_up, down = merge_layer(method, gs, lambda e, lay=layer: read_expert(src, src_layout, lay, e),
                                        lambda name, lay=layer: stats.get(lay, name))
            prefix = layout.layers[layer].prefix
            params = {f"{prefix}.experts.{GATE_UP.memory}": torch.from_numpy(gate_up),
                      f"{prefix}.experts.{DOWN.memory}": torch.from_numpy(down)}
            values.update(disk_tensors(student, layout, params))
    return values


def replace_into(student_dir: Path, values: dict[str, torch.Tensor], out: DerivedCheckpoint, extra: dict) -> None:
    """`student_dir` with `values` replacing its tensors (in their on-disk dtype) into `out`; pruning.json
    is the student's with `extra` added."""
    with Checkpoint(student_dir) as ckpt:
        def produce(info: TensorInfo):
            value = values.get(info.name)
            return None if value is None else iter([to_bytes(value, info.dtype)])

        out.replace_tensors(ckpt, produce)
        out.finish(ckpt, {**provenance.read(student_dir), **extra})


def write_merged(model_dir: Path, plan: Plan, method: str, stats: StatsFile, out: DerivedCheckpoint, work: Path,
                 *, allow_nonuniform: bool = False, progress: bool = False, hash_shards: bool = False) -> dict:
    """The merged checkpoint into `out` (opened by the caller); returns pruning.json's `merge` record.
    Statistics of another model are refused."""
    check_stats_match(model_dir, stats)
    reps, groups = merged_plan(plan, method, stats)
    dropped = rewrite_checkpoint(model_dir, reps, work / "representatives", allow_nonuniform=allow_nonuniform,
                                 progress=progress, hash_shards=hash_shards)
    with Checkpoint(dropped) as student:
        values = merge_values(model_dir, student, method, groups, stats)
    record = merge_record(method, groups)
    replace_into(dropped, values, out, {"merge": record})
    return record


def refit(student_dir: Path, model_dir: Path, out_dir: Path, options: RefitOptions, progress: bool = True) -> dict:
    """heal's layer-local stage (no distillation, no teacher samples) from `student_dir` against `model_dir`
    into `out_dir`; returns heal's record."""
    from surgery.refine.heal.run import HealOptions, heal

    if not options.data:
        from surgery.refine.heal.pairing import HealError

        raise HealError("--refit needs calibration text: give --calib-text PATH")
    return heal(student_dir, model_dir, list(options.data), out_dir,
                HealOptions(tokens=options.tokens, tokens_at_most=True, local_tokens=options.tokens,
                            local_steps=options.steps,
                            local_lr=options.lr, synthesize=False, kd_steps=0, seq_len=options.seq_len,
                            batch_size=options.batch_size, device=options.device, seed=options.seed,
                            progress=progress))
