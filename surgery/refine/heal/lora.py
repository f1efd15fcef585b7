"""Low-rank healing (`heal --lora R`): adapters on the frozen student's fused expert weights.

transformers 5 keeps an MoE layer's experts as two 3-D parameters, `experts.gate_up_proj` and
`experts.down_proj` ([E, 2I, H] and [E, H, I]; gpt-oss transposed), indexed by expert inside the
experts module's forward: there is no nn.Linear per expert. peft's LoRA wraps Linear-like modules,
so it does not see these weights; its newer `target_parameters` path is not a dependency here, and
what is needed is small: one adapter per expert and matrix, W_e + (alpha / r) B_e A_e with
A [E, r, in] and B [E, out, r], applied as a torch parametrization. Every expert implementation of
transformers (eager loop, grouped GEMM, either orientation) then reads the adapted weight
unchanged. The adapted weight is computed once per forward of the experts module
(`parametrize.cached`) under activation checkpointing, so it is not kept for the backward pass
(autograd would hold one adapted copy of every layer's experts, as large as the experts
themselves): it is recomputed there, one layer at a time. B starts at zero, so training starts from the student itself; A starts
Kaiming-uniform as in peft. Router rows stay fully trainable (they are small).

At the end the adapters are merged in float32 (W + (alpha / r) B A) and the merged weights go
through heal's ordinary export, so the output is a plain checkpoint in the student's layout and
dtype. Memory: the frozen weights in the compute dtype, the adapters and their Adam states in
float32, plus one layer's adapted experts at a time (surgery.refine.heal.memory).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping

import torch
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from surgery.model.blocks import find_blocks
from surgery.refine.heal.pairing import HealError, Pairing

ALPHA_PER_RANK = 2.0  # alpha = 2 r, peft's common choice: scale alpha / r = 2 whatever the rank


class ExpertLoRA(torch.nn.Module):
    """The parametrization W -> W + scale * B @ A for a 3-D expert weight [E, out, in]."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        experts, out_dim, in_dim = weight.shape
        a = torch.empty(experts, rank, in_dim)
        bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and peft use
        a.uniform_(-bound, bound, generator=generator)
        self.A = torch.nn.Parameter(a.to(weight.device))
        self.B = torch.nn.Parameter(torch.zeros(experts, out_dim, rank, device=weight.device))
        self.scale = ALPHA_PER_RANK

    def delta(self) -> torch.Tensor:
        return self.scale * torch.bmm(self.B, self.A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def merge_weight(weight: torch.Tensor, adapter: ExpertLoRA) -> torch.Tensor:
    """The merged weight in float32, on the weight's device: W + scale * B @ A."""
    with torch.no_grad():
        return weight.float() + adapter.delta().float()


class MergedValues(Mapping[str, torch.Tensor]):
    """{in-memory parameter name: merged float32 value}, each computed on the device when read: the write
    takes a layer at a time, so the host never holds the whole merged model (23 GiB for a 7.5B student)."""

    def __init__(self, lora: LoRABlocks):
        self._lora = lora
        self._names = [*lora.adapters, *(n for n in lora.params if not n.endswith((".lora_A", ".lora_B")))]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._lora.adapters:
            block_name, pname = name.split(".experts.")
            experts = self._lora.blocks[block_name].experts
            return merge_weight(experts.parametrizations[pname].original, self._lora.adapters[name])
        if name not in self._names:
            raise KeyError(name)
        return self._lora.params[name].detach().float().clone()

    def __contains__(self, name: object) -> bool:
        return name in self._names  # Mapping's own would compute the value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _adapted(forward, *args, **kwargs):
    with parametrize.cached():
        return forward(*args, **kwargs)


def _checkpointed_forward(forward):
    """The experts' forward with the adapted weight built once, and rebuilt in the backward pass."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return _adapted(forward, *args, **kwargs)
        return checkpoint(_adapted, forward, *args, use_reentrant=False, **kwargs)
    return run


class LoRABlocks:
    """Adapters on the experts of some MoE blocks of a model; the rest of the model is frozen."""

    def __init__(self, blocks: dict[str, torch.nn.Module], router_module: str, rank: int, seed: int):
        """`blocks`: {name in the model: MoE block}. Each block's 3-D expert weights get adapters;
        its router rows train in float32."""
        generator = torch.Generator().manual_seed(seed)
        self.blocks = blocks
        self.router_module = router_module
        self.adapters: dict[str, ExpertLoRA] = {}  # "<block>.experts.<param>" -> adapter
        self._forwards: dict[str, object] = {}  # block -> the experts' own instance forward, if any
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, block in blocks.items():
            for p in block.parameters():
                p.requires_grad_(False)
            experts = block.experts
            for pname, weight in list(experts.named_parameters(recurse=False)):
                if weight.dim() != 3:
                    continue  # biases train with nothing: they stay as they are
                adapter = ExpertLoRA(weight, rank, generator)
                parametrize.register_parametrization(experts, pname, adapter)
                self.adapters[f"{name}.experts.{pname}"] = adapter
                self.params[f"{name}.experts.{pname}.lora_A"] = adapter.A
                self.params[f"{name}.experts.{pname}.lora_B"] = adapter.B
            self._forwards[name] = experts.__dict__.get("forward")
            experts.forward = _checkpointed_forward(experts.forward)
            router = block.get_submodule(router_module)
            for rname, p in router.named_parameters():
                self.params[f"{name}.{router_module}.{rname}"] = p
        for p in self.params.values():
            p.requires_grad_(True)

    def float_routers(self) -> None:
        """Router rows in float32 (trained weights are float32; autocast mixes them on a GPU)."""
        for block in self.blocks.values():
            block.get_submodule(self.router_module).float()

    def merged(self) -> MergedValues:
        """Expert weights and router rows as trained, merged when read (float32, on the device)."""
        return MergedValues(self)

    def merge_in_place(self) -> None:
        """Write the merged weights into the modules and drop the adapters (forward as trained, plain parameters)."""
        for name, adapter in self.adapters.items():
            block_name, pname = name.split(".experts.")
            experts = self.blocks[block_name].experts
            original = experts.parametrizations[pname].original
            merged = merge_weight(original, adapter).to(original.device, original.dtype)
            parametrize.remove_parametrizations(experts, pname, leave_parametrized=False)
            with torch.no_grad():
                getattr(experts, pname).copy_(merged)
        for name, block in self.blocks.items():
            if self._forwards[name] is None:
                del block.experts.forward
            else:
                block.experts.forward = self._forwards[name]


def check_lora(pairing: Pairing, rank: int, train: str) -> None:
    """Refuse what low-rank healing cannot do, before any work."""
    if rank <= 0:
        return
    if pairing.sparsified:
        raise HealError(f"{pairing.record_path}: --lora on a sparsified student would fill its zeros "
                        "(the adapters' product is dense); heal it without --lora")
    if train != "experts":
        raise HealError("--lora trains adapters on the pruned layers' experts; --train all is a full-parameter "
                        "fine-tune: use one or the other")


def lora_student(student: torch.nn.Module, pairing: Pairing, rank: int, seed: int) -> LoRABlocks:
    """Adapters on the touched MoE blocks of a whole student model, every other weight frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    spec = pairing.teacher_layout.spec
    blocks = {b.name: student.get_submodule(b.name) for b in find_blocks(student, spec)
              if b.layer in pairing.touched_layers}
    lora = LoRABlocks(blocks, spec.router_module, rank, seed)
    lora.float_routers()
    return lora


def lora_fit(rank: int):
    """The layer-local stage's block fit (surgery.refine.heal.local._fit's signature) on adapters and
    router rows instead of the full expert weights; the block ends merged, in its own dtype."""
    from surgery.refine.heal.local import fit_block, relative_error

    def fit(block: torch.nn.Module, name: str, router_module: str, sparsified: bool, x: torch.Tensor,
            y: torch.Tensor, held_tokens: int, *, steps: int, lr: float, batch_tokens: int,
            generator: torch.Generator, params_out: dict[str, torch.Tensor]) -> dict:
        dtype = next(block.parameters()).dtype
        block.float()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        lora = LoRABlocks({name: block}, router_module, rank, seed)
        n_fit = x.shape[0] - held_tokens
        held = (x[n_fit:], y[n_fit:])
        before = relative_error(block, *held)
        with torch.enable_grad():
            losses, after, best_step = fit_block(block, lora.params, {}, x[:n_fit], y[:n_fit], held, steps=steps,
                                                 lr=lr, batch_tokens=batch_tokens, generator=generator)
        params_out.update(lora.merged())
        lora.merge_in_place()
        for p in block.parameters():
            p.requires_grad_(False)
        block.to(dtype)
        return {"held_out_error_before": before, "held_out_error_after": after, "best_step": best_step,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "steps": steps, "tokens": int(n_fit), "lora_rank": rank}
    return fit
