"""Which student expert is which teacher expert: read from the student's pruning.json, checked.

The healer trains the student to imitate the checkpoint it was cut from, so the pair must agree
on everything pruning leaves alone (architecture, widths, layer count) and the keep-lists must
fit the teacher. The mapping is never guessed: no pruning.json, no heal.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from surgery.architectures import MoELayout, resolve
from surgery.architectures.layout import sub_config
from surgery.errors import UserError
from surgery.io import Checkpoint, provenance
from surgery.io.identity import router_mismatch
from surgery.io.quantization import scheme_for
from surgery.io.requantize import check_encodable
from surgery.io.novice_format import novice_experts
from surgery.refine.heal.export import TORCH_DTYPES
# Config keys that expert removal and sparsification leave unchanged.
_SAME_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


class HealError(UserError):
    """The student/teacher pair or the request cannot be healed."""


@dataclass
class Pairing:
    student: Checkpoint
    teacher: Checkpoint
    student_layout: MoELayout
    teacher_layout: MoELayout
    expert_map: dict[int, list[int]]  # MoE layer -> teacher ids of the student's experts, in order
    sparsified: bool  # zeros from `sparsify` must stay zero
    record: dict = field(default_factory=dict)  # the student's pruning.json
    novices: dict[int, list[int]] = field(default_factory=dict)  # MoNE novice ids per layer (`prune --novices`)

    @property
    def touched_layers(self) -> list[int]:
        """MoE layers pruning changed: experts removed or replaced by novices, or weights zeroed."""
        if self.sparsified:
            return sorted(self.student_layout.layers)
        return sorted({layer for layer, ids in self.expert_map.items() if len(ids) < self.teacher_layout.num_experts}
                      | set(self.novices))

    @property
    def record_path(self) -> Path:
        return self.student.dir / provenance.PRUNING_JSON

    def close(self) -> None:
        self.student.close()
        self.teacher.close()

    def __enter__(self) -> Pairing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_record(student_dir: Path) -> dict:
    doc = provenance.read(student_dir, needed_for="heal needs the record `prune` or `sparsify` writes to map "
                                                  "student experts to the teacher's")
    if not (doc.get("expert_map") or doc.get("sparsity") or doc.get("novices")):
        raise HealError(f"{student_dir / provenance.PRUNING_JSON}: has neither an expert_map (from prune) nor a "
                        "sparsity record (from sparsify) nor novices (from prune --novices)")
    return doc


def _novices(doc: dict, student: Checkpoint, layout: MoELayout) -> dict[int, list[int]]:
    """A novice student keeps every expert id; config.json's novice lists must be the ones `prune` recorded."""
    novices = novice_experts(student.config, str(student.config_path))
    if not novices:
        return {}
    recorded = {int(k): sorted(v) for k, v in (doc.get("novices") or {}).items() if v}
    if recorded != novices:
        raise HealError(f"{student.config_path}: its novices {novices} are not the ones its "
                        f"{provenance.PRUNING_JSON} records ({recorded})")
    bad = sorted(set(novices) - set(layout.layers))
    if bad:
        raise HealError(f"{student.config_path}: novices listed for layers {bad}, which have no experts")
    return novices


def _expert_map(doc: dict, student: MoELayout, teacher: MoELayout, student_dir: Path) -> dict[int, list[int]]:
    keep = provenance.expert_map(doc, student_dir)
    where = student_dir / provenance.PRUNING_JSON
    out = {}
    for layer in student.layers:
        if layer not in teacher.layers:
            raise HealError(f"{where}: layer {layer} is an MoE layer of the student but not of the teacher")
        n_teacher = teacher.num_experts
        ids = keep.get(layer, list(range(n_teacher)))
        bad = [i for i in ids if not 0 <= i < n_teacher]
        if bad:
            raise HealError(f"{where}: layer {layer}: kept ids {bad} out of range for the teacher's {n_teacher} experts")
        if len(ids) != student.num_experts:
            raise HealError(f"{where}: layer {layer}: expert_map keeps {len(ids)} experts, the student has "
                            f"{student.num_experts}")
        out[layer] = ids
    return out


def _check_same(student: Checkpoint, teacher: Checkpoint, s_layout: MoELayout, t_layout: MoELayout) -> None:
    s_cfg = sub_config(student.config, s_layout.spec)
    t_cfg = sub_config(teacher.config, t_layout.spec)
    for key in _SAME_KEYS:
        a, b = (s_cfg.get(key, student.config.get(key)), t_cfg.get(key, teacher.config.get(key)))
        if a != b:
            raise HealError(f"{teacher.config_path}: {key} is {b!r}, the student's ({student.config_path}) is {a!r}; "
                            "the teacher must be the checkpoint the student was pruned from")


def _check_dtypes(student: Checkpoint, layout: MoELayout) -> None:
    """Plain float weights, or quantized ones in the scheme config.json declares, whose companions let them be
    written back (checked on the headers before any training)."""
    scheme = scheme_for(student)
    for entry in layout.layers.values():
        names = [*entry.router, *entry.fused, *(n for ns in entry.per_expert.values() for n in ns)]
        for name in names:
            dtype = student.info(name).dtype
            if dtype in TORCH_DTYPES:
                continue
            if scheme is None:
                raise HealError(f"{student.file_of(name).path}: {name} is {dtype} (quantized), but "
                                f"{student.config_path} declares no quantization scheme (quantization_config)")
            check_encodable(student, name, scheme)


def pair(student_dir: str | Path, teacher_dir: str | Path) -> Pairing:
    """Open and check the pair; raises HealError naming the file at fault."""
    student_dir, teacher_dir = Path(student_dir), Path(teacher_dir)
    doc = _read_record(student_dir)
    if os.path.realpath(student_dir) == os.path.realpath(teacher_dir):
        raise HealError(f"{teacher_dir}: the teacher is the student itself (both name the folder "
                        f"{os.path.realpath(student_dir)}); give --teacher the checkpoint the student was pruned from")
    with contextlib.ExitStack() as opened:  # closed again unless every check passes
        student, teacher = opened.enter_context(Checkpoint(student_dir)), opened.enter_context(Checkpoint(teacher_dir))
        s_layout = resolve(student.config, student.names(), str(student.config_path))
        t_layout = resolve(teacher.config, teacher.names(), str(teacher.config_path))
        _check_same(student, teacher, s_layout, t_layout)
        novices = _novices(doc, student, s_layout)
        expert_map = _expert_map({} if novices else doc, s_layout, t_layout, student_dir)
        _check_dtypes(student, s_layout)
        if not doc.get("heal"):  # a healed student's routers have moved on; a fresh one must match exactly
            bad = router_mismatch(student, s_layout, teacher, expert_map)
            if bad is not None:
                raise HealError(f"{teacher.dir}: {bad} is not the source of the student's ({student_dir}) kept router "
                                "rows; the teacher must be the checkpoint the student was pruned from")
        opened.pop_all()
    return Pairing(student, teacher, s_layout, t_layout, expert_map, bool(doc.get("sparsity")), doc, novices)
