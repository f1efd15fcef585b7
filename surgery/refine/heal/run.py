"""`heal`: layer-local fit, then logits distillation, then the student's own layout written back.

The output has the student's tensor names, dtypes and shards: trained tensors are re-encoded in
their on-disk dtype, every other tensor is copied byte for byte; pruning.json gains a `heal` record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from surgery.collect.run import pick_device, pick_dtype
from surgery.model.data import build_sequences, cap_seq_len
from surgery.io import INDEX_NAME, TensorInfo, atomic_output_dir, rewrite_shard
from surgery.rewrite.experts import _copy_other_files
from surgery.refine.heal.export import disk_tensors, to_bytes
from surgery.refine.heal.pairing import PRUNING_JSON, HealError, Pairing, pair

HELD_OUT_SHARE = 16  # one sequence in 16 is kept aside to measure each stage
SAMPLES_PER_SEQUENCE = 3  # teacher samples per real sequence at most, when the local stage is short of text
DEFAULT_TOKENS = 8 * 2**20  # read at most this much text when --tokens is not given, and distil on this many


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _sequences(pairing: Pairing, data: list[str], tokens: int | None, seq_len: int, seed: int):
    """(training sequences, held-out sequences, seq_len). tokens None = all the text, up to DEFAULT_TOKENS."""
    from surgery.model.load import load_tokenizer

    tokenizer = load_tokenizer(pairing.teacher.dir)
    seq_len = cap_seq_len(pairing.teacher.config, seq_len)
    wanted = -(-(tokens or DEFAULT_TOKENS) // seq_len)
    if wanted < 2:
        raise HealError(f"--tokens {tokens}: need at least two sequences of {seq_len} tokens (one is held out)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = build_sequences(list(data), tokenizer, wanted, seq_len, seed)
    need = wanted if tokens else 2
    if calib.num_sequences < need:
        asked = f"--tokens asks for {need * seq_len}" if tokens else f"heal needs at least {need * seq_len}"
        raise HealError(f"{', '.join(map(str, data))}: only {calib.num_tokens} tokens of text, {asked} "
                        f"({need} sequences of {seq_len})")
    wanted = calib.num_sequences
    held = max(1, wanted // HELD_OUT_SHARE)
    return calib.input_ids[: wanted - held], calib.input_ids[wanted - held:], seq_len


def _write(pairing: Pairing, out_dir: Path, trained: dict[str, torch.Tensor], record: dict, overwrite: bool) -> None:
    ckpt = pairing.student
    values = disk_tensors(ckpt, pairing.student_layout, trained)

    def produce(info: TensorInfo):
        value = values.get(info.name)
        return None if value is None else iter([to_bytes(value, info.dtype)])

    with atomic_output_dir(out_dir, overwrite) as tmp:
        for shard, f in ckpt.files.items():
            rewrite_shard(tmp / shard, f, produce)
        for name in (INDEX_NAME, "config.json"):
            if (ckpt.dir / name).is_file():
                shutil.copy2(ckpt.dir / name, tmp / name)
        _copy_other_files(ckpt, tmp)
        record["tensors_written"] = sorted(values)
        doc = dict(pairing.record)
        doc["heal"] = record
        (tmp / PRUNING_JSON).write_text(json.dumps(doc, indent=2) + "\n")


def heal(
    student_dir: str | Path,
    teacher_dir: str | Path,
    data: list[str],
    out_dir: str | Path,
    *,
    tokens: int | None = None,
    local_steps: int = 200,
    local_tokens: int = 2**18,
    kd_steps: int | None = None,
    kd_tokens: int = DEFAULT_TOKENS,
    batch_size: int = 8,
    train: str = "experts",
    lr: float = 5e-4,
    local_lr: float = 3e-4,
    local_inputs: str = "student",
    synthesize: bool = True,
    seq_len: int = 1024,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Heal `student_dir` against `teacher_dir`; returns the `heal` record written to pruning.json.

    tokens None = all the text in `data`, up to DEFAULT_TOKENS. kd_steps None = as many steps as
    distil on `kd_tokens` tokens, cycling through the training sequences (epochs) when the text is shorter.
    synthesize: when the text gives the local stage fewer than `local_tokens` tokens, the teacher's sampled
    continuations of prefixes of the text make up the difference, up to SAMPLES_PER_SEQUENCE per real
    sequence (surgery.refine.heal.synthetic).
    """
    from surgery.model.load import load_model

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise HealError(f"{out_dir}: output folder already exists (use --overwrite to replace it)")
    if train not in ("experts", "all"):
        raise HealError(f"--train {train!r}: choose experts or all")
    if Path(out_dir).resolve() in (Path(student_dir).resolve(), Path(teacher_dir).resolve()):
        raise HealError(f"{out_dir}: output folder must differ from the student and the teacher")
    pairing = pair(student_dir, teacher_dir)
    try:
        if not pairing.touched_layers:
            raise HealError(f"{pairing.student.dir / PRUNING_JSON}: no MoE layer was pruned; nothing to heal")
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)  # the streamed layers and the teacher; trained weights are float32
        train_ids, held_ids, seq_len = _sequences(pairing, data, tokens, seq_len, seed)
        record: dict = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "teacher": str(Path(teacher_dir).resolve()),
            "data": [{"path": str(p), "sha256": _file_sha256(Path(p))} for p in data],
            "tokens": int(train_ids.numel() + held_ids.numel()),
            "held_out_tokens": int(held_ids.numel()),
            "seq_len": seq_len, "seed": seed, "device": str(dev), "stages": [],
        }
        start = time.perf_counter()
        trained: dict[str, torch.Tensor] = {}
        if local_steps > 0:
            n_local = max(1, min(len(train_ids), local_tokens // seq_len))
            local_ids, sampled = train_ids[:n_local], {}
            missing = min(local_tokens // seq_len, (1 + SAMPLES_PER_SEQUENCE) * n_local) - n_local
            if synthesize and missing > 0:
                from surgery.refine.heal.synthetic import teacher_samples

                t0 = time.perf_counter()
                extra = teacher_samples(load_model(pairing.teacher.dir, str(dev), dt), local_ids, missing, seed, dev,
                                        progress=progress)
                local_ids = torch.cat([local_ids, extra])
                sampled = {"teacher_samples": {"sequences": int(extra.shape[0]), "tokens": int(extra.numel()),
                                               "seconds": round(time.perf_counter() - t0, 2)}}
            batches = [*local_ids.split(batch_size), *held_ids.split(batch_size)]
            from surgery.refine.heal.local import local_stage

            local = local_stage(pairing, batches, held_ids.numel(), steps=local_steps, lr=local_lr,
                                batch_tokens=4096, device=dev, dtype=dt, seed=seed, inputs=local_inputs,
                                progress=progress)
            trained.update(local.params)
            record["stages"].append({"stage": "local", "inputs": local_inputs, "steps_per_layer": local_steps, "lr": local_lr,
                                     "tokens": int(local_ids.numel()), **sampled,
                                     "layers": {str(k): v for k, v in sorted(local.layers.items())}})
        steps = kd_steps if kd_steps is not None else -(-kd_tokens // (batch_size * seq_len))
        if steps > 0:
            from surgery.refine.heal.distill import distill_stage

            teacher = load_model(pairing.teacher.dir, str(dev), dt)
            student = load_model(pairing.student.dir, str(dev), torch.float32)
            with torch.no_grad():
                for name, value in trained.items():
                    student.get_parameter(name).copy_(value)
            kd = distill_stage(pairing, teacher, student, list(train_ids.split(batch_size)),
                               list(held_ids.split(batch_size)), steps=steps, lr=lr, train=train, device=dev,
                               seed=seed, progress=progress)
            trained.update(kd.params)
            record["stages"].append({"stage": "distill", **kd.record})
            del teacher, student
        if not trained:
            raise HealError("both stages are off (--local-steps 0 and --kd-steps 0): nothing to do")
        record["seconds"] = round(time.perf_counter() - start, 2)
        if dev.type == "cuda":
            record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
        _write(pairing, out_dir, trained, record, overwrite)
        return record
    finally:
        pairing.close()
