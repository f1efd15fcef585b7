"""heal's host memory does not grow with the model: each layer's trained tensors leave RAM for the spill folder as
soon as the layer is fitted, the distillation reads them back a layer at a time, the write streams them, and
the bytes written are exactly those of the trained values encoded in memory (the former all-in-RAM path)."""

from __future__ import annotations

import gc
import json
import random
import weakref
from pathlib import Path

import pytest
import torch

import surgery.refine.heal.distill as distill_module
import surgery.refine.heal.local as local_module
from surgery.architectures import resolve
from surgery.io import Checkpoint
from surgery.plan import Plan
from surgery.refine.heal import write as write_module
from surgery.refine.heal.export import disk_tensors, to_bytes
from surgery.refine.heal.run import HealOptions, heal
from surgery.refine.heal.spill import SPILL_DIR, Spill
from surgery.rewrite.experts import rewrite_checkpoint
from tiny_models import build_tiny, checkpoint_bytes
from tiny_tokenizer import save_tiny_tokenizer

WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7".split()
FAST = dict(tokens=24 * 16, seq_len=24, batch_size=4, local_tokens=24 * 16, device="cpu", progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(teacher, student, calibration text): qwen3_moe per-expert, two MoE layers pruned to 4 of 8 experts."""
    root = tmp_path_factory.mktemp("heal-spill")
    teacher = root / "teacher"
    build_tiny("qwen3_moe", teacher, layout="per-expert")
    save_tiny_tokenizer(teacher, vocab_size=128)
    ckpt = Checkpoint(teacher)
    layers = resolve(ckpt.config, ckpt.names()).layers
    ckpt.close()
    student = root / "student"
    rewrite_checkpoint(teacher, Plan({layer: [0, 3, 4, 6] for layer in layers}), student)
    rng = random.Random(3)
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))}) + "\n"
                            for _ in range(120)))
    return teacher, student, data


class _Resident:
    """Weak references to every layer's trained tensors handed over so far: how many layers are still alive."""

    def __init__(self):
        self.refs: list[list[weakref.ref]] = []
        self.most_alive_before = 0  # layers handed over earlier that are still in memory when the next one arrives

    def handed(self, params: dict[str, torch.Tensor]) -> None:
        gc.collect()
        alive = sum(any(r() is not None for r in layer) for layer in self.refs)
        self.most_alive_before = max(self.most_alive_before, alive)
        self.refs.append([weakref.ref(v) for v in params.values()])


@pytest.mark.parametrize("kd_steps", [0, 2])
def test_trained_layers_leave_memory_as_they_are_done(pair, tmp_path: Path, monkeypatch, kd_steps: int) -> None:
    teacher, student, data = pair
    resident = _Resident()
    put_values, put = Spill.put_values, write_module.LayerWriter.put

    def spy_values(self, group, values):
        resident.handed(values)
        return put_values(self, group, values)

    def spy_put(self, group, params):
        if not kd_steps:
            resident.handed(params)
        return put(self, group, params)

    monkeypatch.setattr(Spill, "put_values", spy_values)
    monkeypatch.setattr(write_module.LayerWriter, "put", spy_put)
    record = heal(student, teacher, [str(data)], tmp_path / "out", HealOptions(local_steps=3, kd_steps=kd_steps, **FAST))
    assert len(resident.refs) == 2 == len(record["stages"][0]["layers"])  # two layers fitted, handed one by one
    assert resident.most_alive_before == 0  # none of them still held when the next arrives
    assert not (tmp_path / "out" / SPILL_DIR).exists() and not list(tmp_path.glob("*heal-spill*"))


@pytest.mark.parametrize("kd_steps", [0, 2])
def test_spilled_output_is_byte_identical_to_the_in_memory_encoding(pair, tmp_path: Path, monkeypatch,
                                                                    kd_steps: int) -> None:
    """The trained values as training left them (captured in memory) encoded directly == the bytes written."""
    teacher, student, data = pair
    trained: dict[str, torch.Tensor] = {}
    fit, stage = local_module._fit, distill_module.distill_stage

    def capture_fit(*args, **kwargs):
        result = fit(*args, **kwargs)
        trained.update({n: v.clone() for n, v in kwargs["params_out"].items()})
        return result

    def capture_distill(*args, **kwargs):
        result = stage(*args, **kwargs)
        trained.update({n: v.detach().clone() for n, v in result.params.items()})
        return result

    monkeypatch.setattr(local_module, "_fit", capture_fit)
    monkeypatch.setattr(distill_module, "distill_stage", capture_distill)
    out = tmp_path / "out"
    heal(student, teacher, [str(data)], out, HealOptions(local_steps=3, kd_steps=kd_steps, **FAST))
    ckpt = Checkpoint(student)
    expected = {n: to_bytes(v, ckpt.info(n).dtype)
                for n, v in disk_tensors(ckpt, resolve(ckpt.config, ckpt.names()), trained).items()}
    ckpt.close()
    before, after = checkpoint_bytes(student), checkpoint_bytes(out)
    assert expected and before.keys() == after.keys()
    for name, (dtype, shape, raw) in after.items():
        assert (dtype, shape) == before[name][:2]
        assert raw == expected.get(name, before[name][2]), name
    assert any(expected[n] != before[n][2] for n in expected)


def test_a_failed_write_leaves_no_output_and_no_spill(pair, tmp_path: Path, monkeypatch) -> None:
    teacher, student, data = pair

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("surgery.refine.heal.run.write_output", broken)
    with pytest.raises(OSError, match="disk full"):
        heal(student, teacher, [str(data)], tmp_path / "out", HealOptions(local_steps=2, kd_steps=0, **FAST))
    assert list(tmp_path.iterdir()) == []


def test_the_local_stage_drops_its_per_batch_captures_and_trims_the_heap(pair, tmp_path: Path, monkeypatch) -> None:
    """Building the sequential pairs empties the captured per-batch lists (no second copy of the cached tokens
    stays alive), and freed memory is handed back to the system around them (glibc keeps it otherwise)."""
    import sys

    from surgery.model import heap

    teacher, student, data = pair
    trims, emptied = [], []
    build = local_module._sequential_pairs

    def spy(student_io, s_store, t_store):
        out = build(student_io, s_store, t_store)
        emptied.append(not student_io.x and not student_io.y)
        return out

    monkeypatch.setattr(local_module, "_sequential_pairs", spy)
    monkeypatch.setattr(local_module, "release_free_memory", lambda: trims.append(1))
    record = heal(student, teacher, [str(data)], tmp_path / "out", HealOptions(local_steps=2, kd_steps=0, **FAST))
    fitted = len(record["stages"][0]["layers"])
    assert emptied == [True] * fitted and fitted == 2
    assert len(trims) >= 2 * fitted
    assert (heap._TRIM is not None) == sys.platform.startswith("linux")
