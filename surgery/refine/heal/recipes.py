"""Heal recipes (`heal --recipe`): ours by default, or a paper's own procedure by name.

* `default`: the layer-local fit, then KL(teacher logits || student logits), training the router
  rows and experts of pruned layers, AdamW at lr 5e-4 (surgery.refine.heal.run).
* `moe-pruner`: MoE-Pruner's expert-wise knowledge distillation (arXiv 2410.12013, Eq. 10):
  L = L_CE + lambda * sum over layers and experts of MSE(teacher expert output, student expert
  output), a full-parameter fine-tune at lr 2e-5, no layer-local stage. lambda is set on the first
  step to L_CE / L_expert so that the two terms start equal, as the paper balances them. Student
  expert j (on the student's block input) is compared with the teacher expert it was kept from
  (pruning.json's map, on the teacher's block input), over the tokens the teacher routes to that
  expert; L_CE is the student's next-token cross-entropy on the calibration text. Deviation: the
  paper prunes weights inside experts, where the experts differ from the start; for an
  expert-pruned student they differ only through the hidden-state drift of the layers below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize


from surgery.refine.heal.distill import ExpertWiseLoss
from surgery.refine.heal.pairing import Pairing

RECIPES = ("default", "moe-pruner")
RECIPE_LR = {"default": 5e-4, "moe-pruner": 2e-5}


class _ExpertMSE(ExpertWiseLoss):
    """The expert-wise term with the paper's plain MSE (mean over the expert's tokens and outputs).

    The student's expert runs on the student's own block input (what it sees in the student), the
    teacher's on the teacher's: for an expert-pruned student the kept experts equal the teacher's,
    so on shared inputs the term would be zero; the difference is the drift that pruning left in
    the hidden states, and its gradient reaches every parameter below (a full fine-tune)."""

    def __init__(self, pairing: Pairing, teacher: torch.nn.Module, student: torch.nn.Module):
        super().__init__(pairing, teacher, student)
        self.student_seen: dict[int, torch.Tensor] = {}
        self._student_originals = {}
        for layer in self.teacher_blocks:
            experts = self.student_blocks[layer].experts
            self._student_originals[layer] = experts.__dict__.get("forward")
            experts.forward = self._capture_student(layer, experts.forward)

    def _capture_student(self, layer: int, original):
        def forward(hidden_states, *args, **kwargs):
            self.student_seen[layer] = hidden_states
            return original(hidden_states, *args, **kwargs)
        return forward

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        with parametrize.cached():  # LoRA students: the adapted weight once per layer, not once per expert
            for ours, target in self.pairs(self.student_seen):
                total = total.to(ours.device) + F.mse_loss(ours, target)
        self.seen.clear()
        self.student_seen.clear()
        return total

    def restore(self) -> None:
        super().restore()
        for layer, original in self._student_originals.items():
            experts = self.student_blocks[layer].experts
            if original is None:
                del experts.forward
            else:
                experts.forward = original


class MoEPrunerObjective:
    """L_CE + lambda * L_expert, lambda fixed on the first call so that both terms start equal."""

    def __init__(self, pairing: Pairing, teacher: torch.nn.Module, student: torch.nn.Module):
        self.expert = _ExpertMSE(pairing, teacher, student)
        self.lam: float | None = None
        self.first: tuple[float, float] | None = None

    def __call__(self, logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        expert = self.expert().to(ce.device)
        if self.lam is None:
            self.first = (float(ce.detach()), float(expert.detach()))
            # both terms equal at the start; 1 when the expert term starts at zero (nothing to balance)
            self.lam = self.first[0] / self.first[1] if self.first[1] > 0 else 1.0
        return ce + self.lam * expert

    def record(self) -> dict:
        ce, expert = self.first or (None, None)
        return {"recipe": "moe-pruner", "lambda": self.lam, "first_ce": ce, "first_expert_loss": expert}

    def restore(self) -> None:
        self.expert.restore()
