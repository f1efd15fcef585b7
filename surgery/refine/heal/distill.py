"""Distillation stage: train the student end to end on KL(teacher logits || student logits).

By default only the router rows and routed experts of the layers pruning touched train (what
pruning changed); `train="all"` trains every weight. AdamW with warm-up and cosine decay,
gradient clipping, bf16 autocast on GPU with float32 master weights. The held-out KL is measured
about ten times along the way and the student ends in its best state (early stopping, since long
runs cycle through a small calibration set many times). For sparsified students
the paper's expert-wise term is added (each student expert imitates the same teacher expert on
the tokens the teacher routes to it) and the zero pattern is re-imposed after every step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery.model.expert_math import expert_forward
from surgery.model.blocks import find_blocks
from surgery.refine.heal.distributed import full
from surgery.refine.heal.local import lr_at, masks_of, optimizer_step, trainable
from surgery.refine.heal.pairing import Pairing


@dataclass
class DistillResult:
    # in-memory name -> the trained parameter itself (fp32, where the student is): no host copy of the model
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def held_out_kl(student, teacher, batches: list[torch.Tensor], device: torch.device, autocast) -> float:
    total, n = 0.0, 0
    with torch.no_grad(), autocast():
        for ids in batches:
            ids = ids.to(device)
            total += float(kl_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits)) * ids.numel()
            n += ids.numel()
    return total / max(n, 1)


class ExpertWiseLoss:
    """MoE-Pruner's expert-wise term: for each touched layer, the MSE between student expert j and
    teacher expert keep[j] on the teacher's block input, over the tokens the teacher routes there."""

    def __init__(self, pairing: Pairing, teacher: torch.nn.Module, student: torch.nn.Module):
        spec = pairing.teacher_layout.spec
        self.kind = spec.expert_math
        self.map = pairing.expert_map
        self.teacher_blocks = {b.layer: b for b in find_blocks(teacher, spec) if b.layer in pairing.touched_layers}
        self.student_blocks = {b.layer: b for b in find_blocks(student, spec)}
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._originals = {}
        for layer, b in self.teacher_blocks.items():
            self._originals[layer] = b.experts.forward
            b.experts.forward = self._capture(layer, b.experts.forward)

    def _capture(self, layer: int, original):
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            self.seen[layer] = (hidden_states.detach(), top_k_index.detach())
            return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return forward

    def pairs(self, student_inputs: dict[int, torch.Tensor] | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(student expert j's output, teacher expert keep[j]'s output) in float32 on the tokens the teacher
        routes to keep[j]; the student sees its own block input where `student_inputs` gives it."""
        for layer, (x, idx) in self.seen.items():
            teacher_experts = self.teacher_blocks[layer].experts
            student_experts = self.student_blocks[layer].experts
            for j, t_id in enumerate(self.map[layer]):
                rows = (idx == t_id).any(dim=-1).nonzero().squeeze(-1)
                if rows.numel() == 0:
                    continue
                with torch.no_grad():
                    target = expert_forward(teacher_experts, self.kind, t_id, x[rows])[1].float()
                xs = (student_inputs[layer][rows] if student_inputs is not None
                      else x[rows].to(student_experts.down_proj.dtype))
                yield expert_forward(student_experts, self.kind, j, xs)[1].float(), target

    def __call__(self) -> torch.Tensor:
        total = None
        for ours, target in self.pairs():
            term = self.term(ours, target)
            total = term if total is None else total + term
        self.seen.clear()
        return total if total is not None else torch.zeros(())

    @staticmethod
    def term(ours: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One expert's error on its tokens: relative squared error (scale-free across layers)."""
        return F.mse_loss(ours, target, reduction="sum") / max(float((target**2).sum()), 1e-12)

    def restore(self) -> None:
        for layer, b in self.teacher_blocks.items():
            b.experts.forward = self._originals[layer]


def _trainable(student: torch.nn.Module, pairing: Pairing, train: str) -> dict[str, torch.nn.Parameter]:
    if train == "all":
        return dict(student.named_parameters())
    spec = pairing.teacher_layout.spec
    out = {}
    for b in find_blocks(student, spec):
        if b.layer in pairing.touched_layers:
            block = student.get_submodule(b.name)
            out.update({f"{b.name}.{n}": p for n, p in trainable(block, spec.router_module).items()})
    return out


CHECKS = 10  # held-out measurements per run


def _copy_into(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in dst.items():
            t.copy_(src[n].detach())


def distill_stage(pairing: Pairing, teacher, student, train_batches: list[torch.Tensor],
                  held_batches: list[torch.Tensor], *, steps: int, lr: float, train: str,
                  device: torch.device, seed: int, progress: bool = True, params: dict | None = None,
                  objective=None, snapshot_dtype: torch.dtype | None = None) -> DistillResult:
    """Train `student` in place for `steps` batches (cycling through `train_batches`), ending in the
    state with the lowest held-out KL (the starting state if none is lower).

    params: what trains (default: per `train`; surgery.refine.heal.lora passes adapters). objective:
    the training loss `objective(student_logits, teacher_logits, ids)` in place of the KL (a recipe of
    surgery.refine.heal.recipes; its `record()` joins the stage's record and `restore()` ends it).
    snapshot_dtype: the best state's copy in this dtype (surgery.refine.heal.memory.snapshot_dtype), updated
    in place: a second float32 copy of every trained weight is what ran a 7.5B full heal out of memory."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = params if params is not None else _trainable(student, pairing, train)
    for p in params.values():
        p.requires_grad_(True)
    masks = masks_of(params, pairing.sparsified)
    expert_wise = ExpertWiseLoss(pairing, teacher, student) if pairing.sparsified and objective is None else None
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # fused on a GPU: the default foreach update allocates temporaries as large as the trained weights
    fused = device.type == "cuda" and not any(hasattr(p, "device_mesh") for p in params.values())
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused or None)
    kl_before = held_out_kl(student, teacher, held_batches, device, autocast)
    best_kl, best_step = kl_before, 0
    best = {n: p.detach().to(snapshot_dtype or p.dtype, copy=True) for n, p in params.items()}
    check_every = max(1, steps // CHECKS)
    checks: list[tuple[int, float]] = []
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    student.train()
    bar = tqdm(total=steps, desc="Distilling", unit="step", disable=not progress)
    for step in range(steps):
        if not order:
            order = torch.randperm(len(train_batches), generator=generator).tolist()
        ids = train_batches[order.pop()].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        with autocast():
            with torch.no_grad():
                target = teacher(input_ids=ids).logits
            logits = student(input_ids=ids).logits
            loss = kl_loss(logits, target) if objective is None else objective(logits, target, ids)
            if expert_wise is not None:
                loss = loss + expert_wise()
        losses.append(optimizer_step(opt, loss, params, masks))
        tokens += ids.numel()
        bar.update(1)
        if (step + 1) % check_every == 0 or step + 1 == steps:
            student.eval()
            kl = held_out_kl(student, teacher, held_batches, device, autocast)
            student.train()
            checks.append((step + 1, kl))
            if kl < best_kl:
                best_kl, best_step = kl, step + 1
                _copy_into(best, params)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", held_kl=f"{best_kl:.4f}",
                        tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    student.eval()
    for ending in (expert_wise, objective):
        if ending is not None:
            ending.restore()
    _copy_into(params, best)
    record = {"steps": steps, "tokens": tokens, "lr": lr, "train": train, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "held_out_kl_before": kl_before,
              "held_out_kl_after": best_kl, "best_step": best_step,
              "held_out_kl_checks": [[s, k] for s, k in checks],
              "seconds": round(time.perf_counter() - start, 2), "expert_wise_loss": expert_wise is not None,
              **(objective.record() if objective is not None else {})}
    # live values (gathered whole when sharded: every rank takes part), not a host copy of every trained weight
    return DistillResult({n: full(p).detach() for n, p in params.items()}, record)
