"""MoE-Lottery (MC-Suite, arXiv 2504.05586, §3): fine-tune the pruned model between pruning rounds.

The paper's recipe: next-token cross-entropy on the calibration data, every parameter trained, AdamW
with a cosine learning-rate decay (peak 1e-6), batches of 8 sequences, a fresh optimizer every round,
and 0.2M tokens in round 1, doubling each round (`round_tokens`). Unlike `heal` there is no teacher
in the loss and no early stopping: the teacher (the checkpoint the student was cut from) is only
opened to check the pair and to carry the student's pruning record forward, as `heal` does.
The step, the zero pattern of sparsified experts and the write-back are heal's own
(surgery.refine.heal.local.optimizer_step, masks_of; surgery.refine.heal.export).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from surgery.collect.run import pick_device
from surgery.io import TensorInfo
from surgery.io.derived import DerivedCheckpoint
from surgery.io.provenance import now
from surgery.model.data import build_sequences, cap_seq_len
from surgery.refine.heal.export import disk_tensors, to_bytes
from surgery.refine.heal.local import masks_of, optimizer_step
from surgery.refine.heal.pairing import HealError, Pairing, pair

ROUND1_TOKENS = 200_000  # MC-Suite §3: 0.2M tokens in the first round
LR = 1e-6
BATCH_SIZE = 8


def round_tokens(first: int, index: int, schedule: str) -> int:
    """Tokens for round `index` (0-based): `first` every round ("constant") or `first * 2**index` ("doubling")."""
    if schedule not in ("constant", "doubling"):
        raise ValueError(f"unknown token schedule {schedule!r} (expected constant or doubling)")
    return first * 2**index if schedule == "doubling" else first


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """Cosine decay from `lr` at step 0 to 0 after the last step, no warm-up (the paper names none)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


@dataclass(frozen=True)
class LotteryOptions:
    """One round's fine-tune: `tokens` of calibration text in sequences of `seq_len`, `batch_size` a step."""

    tokens: int = ROUND1_TOKENS
    lr: float = LR
    batch_size: int = BATCH_SIZE
    seq_len: int = 2048
    device: str | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def lottery(student_dir: str | Path, teacher_dir: str | Path, data: list[str], out_dir: str | Path,
            options: LotteryOptions = LotteryOptions()) -> dict:
    """Fine-tune `student_dir` (pruned from `teacher_dir`) into `out_dir`; returns the `heal` record."""
    if options.tokens < 1 or options.lr <= 0:
        raise HealError(f"lottery needs tokens >= 1 and a positive learning rate (got {options.tokens}, {options.lr})")
    with DerivedCheckpoint(out_dir, overwrite=options.overwrite, inputs=[student_dir, teacher_dir],
                           inputs_label="the student and the teacher") as out, pair(student_dir, teacher_dir) as pairing:
        device = pick_device(options.device)
        batches = _batches(pairing, data, options)
        start = time.perf_counter()
        trained, losses = _train(pairing, batches, options, device)
        record = {"created": now(), "recipe": "moe-lottery", "teacher": str(Path(teacher_dir).resolve()),
                  "stages": [{"stage": "lottery", "loss": "next-token cross-entropy", "train": "all",
                              "steps": len(batches), "tokens": int(sum(b.numel() for b in batches)),
                              "lr": options.lr, "schedule": "cosine", "batch_size": options.batch_size,
                              "first_loss": losses[0], "last_loss": losses[-1]}],
                  "seed": options.seed, "device": str(device), "seconds": round(time.perf_counter() - start, 2)}
        _write(pairing, trained, out, record)
    return record


def _batches(pairing: Pairing, data: list[str], options: LotteryOptions) -> list[torch.Tensor]:
    """ceil(tokens / (batch_size * seq_len)) batches of packed calibration sequences, cycling through the
    text when it is shorter."""
    from surgery.model.load import load_tokenizer

    seq_len = cap_seq_len(pairing.teacher.config, options.seq_len)
    steps = -(-options.tokens // (options.batch_size * seq_len))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = build_sequences(list(data), load_tokenizer(pairing.student.dir), steps * options.batch_size, seq_len,
                              options.seed).input_ids
    if ids.shape[0] == 0:
        raise HealError(f"{', '.join(map(str, data))}: no sequence of {seq_len} tokens for the lottery fine-tune")
    order = torch.arange(steps * options.batch_size) % ids.shape[0]
    return list(ids[order].split(options.batch_size))


def _train(pairing: Pairing, batches: list[torch.Tensor], options: LotteryOptions,
           device: torch.device) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every parameter, float32 master weights (bf16 autocast on GPU), a new AdamW each call."""
    from surgery.model.load import load_model

    model = load_model(pairing.student.dir, str(device), torch.float32)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    masks = masks_of(params, pairing.sparsified)
    opt = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=0.0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    losses: list[float] = []
    model.train()
    for step, ids in enumerate(tqdm(batches, desc="Lottery fine-tune", unit="step", disable=not options.progress)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, len(batches), options.lr)
        ids = ids.to(device)
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        losses.append(optimizer_step(opt, loss, params, masks))
    model.eval()
    return {n: p.detach().to("cpu", torch.float32) for n, p in params.items()}, losses


def _write(pairing: Pairing, trained: dict[str, torch.Tensor], out: DerivedCheckpoint, record: dict) -> None:
    """The student with every trained tensor in its on-disk dtype; pruning.json gains the `heal` record."""
    ckpt = pairing.student
    values = disk_tensors(ckpt, pairing.student_layout, trained)

    def produce(info: TensorInfo):
        value = values.get(info.name)
        return None if value is None else iter([to_bytes(value, info.dtype)])

    out.replace_tensors(ckpt, produce)
    out.finish(ckpt, {**pairing.record, "heal": record})
