"""Layer-local stage expert by expert, for MoE blocks whose joint fit does not fit on the device.

The joint fit (surgery.refine.heal.local._fit) trains a whole block in float32 with Adam: 16 bytes
per parameter of the block. Here the block stays in its own dtype and only one expert trains at a
time (a float32 copy of its weights with Adam states), then the router rows:

1. Each kept expert j is fitted, on the tokens the student routes to it, to the part of the
   teacher block's output that is its to produce: y - (block output - g_j E_j(x)), the teacher's
   output minus the rest of the student block, weighted by its routing weight g_j. For a student
   whose other experts equal the teacher's this is the teacher expert's own weighted output on its
   tokens (MoE-Pruner's expert-wise objective); after expert removal it also takes up what the
   removed experts did for those tokens. Experts are fitted one after the other, each on the
   block output as the experts before it left it (block-coordinate descent on the block's error).
2. The router rows are fitted on the block's error with every expert frozen.

Each fit keeps its best state on the held-out tokens (early stopping, as the joint fit), and the
block returns to its starting weights if its held-out error ends higher. Formulas other than the
plain GLU (gate_up_proj [E, 2I, H], down_proj [E, H, I]) keep the joint fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from surgery.architectures.expert_math import EXPERT_MATH
from surgery.refine.heal.local import block_output, lr_at

CHUNK = 8192
CHECK_EVERY = 25


def supports(kind: str) -> bool:
    return kind in EXPERT_MATH and EXPERT_MATH[kind].formula == "glu"


def _error(block: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, override: dict | None = None) -> float:
    """sum ||block(x) - y||^2 / sum ||y||^2, the block in its own dtype (router rows from `override`)."""
    dtype = block.experts.down_proj.dtype
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], CHUNK):
            out = _forward(block, x[i:i + CHUNK].to(dtype), override).float()
            yb = y[i:i + CHUNK].float()
            num += float(((out - yb) ** 2).sum())
            den += float((yb**2).sum())
    return num / max(den, 1e-30)


def _forward(block: torch.nn.Module, x: torch.Tensor, override: dict | None) -> torch.Tensor:
    if not override:
        return block_output(block, x)
    return functional_call(block, override, (x.unsqueeze(0),)).squeeze(0)


def _routed(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block output float32, top-k expert ids, their routing weights float32) for every token."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = block.experts.register_forward_pre_hook(lambda m, args: seen.append((args[1], args[2])))
    dtype = block.experts.down_proj.dtype
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], CHUNK):
                outs.append(block_output(block, x[i:i + CHUNK].to(dtype)).float())
    finally:
        handle.remove()
    return torch.cat(outs), torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen]).float()


def _expert(gate_up: torch.Tensor, down: torch.Tensor, act, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down)


def _fit_expert(experts, j: int, x, target, weight, n_fit: int, *, steps: int, lr: float, batch_tokens: int,
                generator: torch.Generator, sparsified: bool) -> tuple[float, float]:
    """Adam on expert j's float32 copy toward `target` (its routed tokens; the last ones from n_fit on are
    held out); a sparsified expert keeps its zeros. Writes the best state back; returns (held-out error
    before, after)."""
    weights = [experts.gate_up_proj[j].detach().float().clone().requires_grad_(True),
               experts.down_proj[j].detach().float().clone().requires_grad_(True)]
    masks = [w.detach() != 0 for w in weights] if sparsified else []
    fit_x, held_x = x[:n_fit].float(), x[n_fit:].float()

    def error(rows: slice) -> float:
        with torch.no_grad():
            ours = weight[rows, None] * _expert(*weights, experts.act_fn, x[rows].float())
            return float(((ours - target[rows]) ** 2).sum() / max(float((target[rows] ** 2).sum()), 1e-30))

    held = slice(n_fit, None)
    if fit_x.shape[0] == 0 or held_x.shape[0] == 0:
        return 0.0, 0.0
    before = best_error = error(held)
    best = [w.detach().clone() for w in weights]
    opt = torch.optim.Adam(weights, lr=lr)
    scale = float((target[:n_fit] ** 2).mean()) or 1.0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, max(1, steps // 20))
        idx = torch.randint(0, n_fit, (min(batch_tokens, n_fit),), generator=generator).to(x.device)
        loss = F.mse_loss(weight[idx, None] * _expert(*weights, experts.act_fn, fit_x[idx]), target[idx]) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        with torch.no_grad():
            for w, mask in zip(weights, masks):
                w.mul_(mask)
        if step % CHECK_EVERY == 0 or step == steps:
            if (e := error(held)) < best_error:
                best_error, best = e, [w.detach().clone() for w in weights]
    with torch.no_grad():
        experts.gate_up_proj[j].copy_(best[0])
        experts.down_proj[j].copy_(best[1])
    return before, best_error


def _fit_router(block, router_module: str, x, y, n_fit: int, *, steps: int, lr: float, batch_tokens: int,
                generator: torch.Generator) -> None:
    """Adam on float32 copies of the router's parameters, every expert frozen; best held-out state kept."""
    router = block.get_submodule(router_module)
    dtype = block.experts.down_proj.dtype
    masters = {f"{router_module}.{n}": p.detach().float().clone().requires_grad_(True)
               for n, p in router.named_parameters()}
    cast = lambda: {n: m.to(dtype) for n, m in masters.items()}  # noqa: E731
    best_error, best = _error(block, x[n_fit:], y[n_fit:]), {n: m.detach().clone() for n, m in masters.items()}
    opt = torch.optim.Adam(masters.values(), lr=lr)
    scale = float((y[:n_fit].float() ** 2).mean()) or 1.0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, max(1, steps // 20))
        idx = torch.randint(0, n_fit, (min(batch_tokens, n_fit),), generator=generator).to(x.device)
        loss = F.mse_loss(_forward(block, x[idx].to(dtype), cast()).float(), y[idx].float()) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % CHECK_EVERY == 0 or step == steps:
            if (e := _error(block, x[n_fit:], y[n_fit:], cast())) < best_error:
                best_error, best = e, {n: m.detach().clone() for n, m in masters.items()}
    with torch.no_grad():
        for n, p in router.named_parameters():
            p.copy_(best[f"{router_module}.{n}"])


def expert_fit(block: torch.nn.Module, name: str, router_module: str, sparsified: bool, x: torch.Tensor,
               y: torch.Tensor, held_tokens: int, *, steps: int, lr: float, batch_tokens: int,
               generator: torch.Generator, params_out: dict[str, torch.Tensor]) -> dict:
    """local._fit's contract, expert by expert, then the router rows (module docstring)."""
    experts = block.experts
    for p in block.parameters():
        p.requires_grad_(False)
    start = {n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()}
    n_fit = x.shape[0] - held_tokens
    before = _error(block, x[n_fit:], y[n_fit:])
    out, idx, w = _routed(block, x)
    per_expert = {}
    for j in range(experts.down_proj.shape[0]):
        rows, slot = (idx == j).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        g = w[rows, slot]
        with torch.no_grad():
            own = g[:, None] * _expert(experts.gate_up_proj[j].float(), experts.down_proj[j].float(), experts.act_fn,
                                       x[rows].float())
        target = y[rows].float() - out[rows] + own
        per_expert[j] = _fit_expert(experts, j, x[rows], target, g, int((rows < n_fit).sum()), steps=steps, lr=lr,
                                    batch_tokens=batch_tokens, generator=generator, sparsified=sparsified)
        with torch.no_grad():  # the next experts see the block as this one left it
            out[rows] += g[:, None] * _expert(experts.gate_up_proj[j].float(), experts.down_proj[j].float(),
                                              experts.act_fn, x[rows].float()) - own
    _fit_router(block, router_module, x, y, n_fit, steps=steps, lr=lr, batch_tokens=batch_tokens, generator=generator)
    after = _error(block, x[n_fit:], y[n_fit:])
    if after > before:
        with torch.no_grad():
            for n, p in block.named_parameters():
                p.copy_(start[n])
        after = before
    params_out.update({f"{name}.{n}": p.detach().to("cpu", torch.float32).clone() for n, p in block.named_parameters()
                       if n.startswith((f"{router_module}.", "experts."))})
    return {"held_out_error_before": before, "held_out_error_after": after, "fit": "experts", "steps": steps,
            "tokens": int(n_fit), "experts": {str(j): [b, a] for j, (b, a) in per_expert.items()}}
