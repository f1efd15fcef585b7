"""Layer-local stage: fit each pruned MoE block to the teacher's block, one decoder layer at a time.

The teacher is streamed with the collector's layer streaming; a hook caches its MoE block's
inputs and outputs on the calibration tokens. Once every batch has been through teacher layer l,
the student's block l is materialised from its shards and its router rows and kept experts are
trained so that, on the teacher's inputs, it reproduces the teacher block's output (MSE). Peak
accelerator memory is one teacher layer, one student block and the cache of one layer.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery.model.blocks import find_blocks
from surgery.model.heap import release_free_memory
from surgery.model.novices import attach_checkpoint_novices
from surgery.model.streaming import HiddenStore, LayerPrefetcher, decoder_layers, load_frame, record_calls
from surgery.refine.heal.pairing import Pairing


# Receives each fitted layer's trained parameters (in-memory name -> float32 value, still on the compute
# device) as soon as it is done.
LayerSink = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class LocalResult:
    # in-memory name -> trained value (CPU, fp32); empty when local_stage hands each layer to `on_layer`
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, dict] = field(default_factory=dict)  # layer -> held-out errors, losses, steps


def trainable(block: torch.nn.Module, router_module: str) -> dict[str, torch.nn.Parameter]:
    """Router and routed-expert parameters of an MoE block: what expert removal touched.
    Shared experts and their gates stay as they are."""
    return {n: p for n, p in block.named_parameters() if n.startswith((f"{router_module}.", "experts."))}


def masks_of(params: dict[str, torch.nn.Parameter], sparsified: bool) -> dict[str, torch.Tensor]:
    """Where a sparsified student's expert weights are zero: they must stay zero."""
    if not sparsified:
        return {}
    return {n: p.detach() != 0 for n, p in params.items() if ".experts." in f".{n}" and p.dim() >= 2}


def block_output(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def relative_error(block: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    """sum ||block(x) - y||^2 / sum ||y||^2 over the given tokens."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb, yb = x[i:i + chunk].float(), y[i:i + chunk].float()
            num += float(((block_output(block, xb) - yb) ** 2).sum())
            den += float((yb**2).sum())
    return num / max(den, 1e-30)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: dict[str, torch.nn.Parameter],
                   masks: dict[str, torch.Tensor]) -> float:
    """Backward, clip to norm 1, step, then re-impose the zero pattern of sparsified weights; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return loss.item()


def fit_block(block: torch.nn.Module, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor], *, steps: int, lr: float,
              batch_tokens: int, generator: torch.Generator, check_every: int | None = None
              ) -> tuple[list[float], float, int]:
    """Adam on the relative MSE between block(x) and y over random token minibatches.

    The held-out error is measured every `check_every` steps (default: 20 checks per fit, at most 25 steps
    apart) and the block ends in its best state (step 0 = unchanged): early stopping, since a few thousand
    routed tokens per expert overfit fast. On a 7.5B model with 15K tokens the held-out error had already
    risen by step 25 in every layer, so a check only every 25 steps kept the starting state every time.
    Returns (losses, best held-out error, step it was reached at).
    """
    check_every = check_every or max(1, min(25, steps // 20))
    opt = torch.optim.Adam(params.values(), lr=lr)
    scale = float((y.float() ** 2).mean()) or 1.0
    best_error, best_step = relative_error(block, *held), 0
    best = {n: p.detach().clone() for n, p in params.items()}
    losses = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, max(1, steps // 20))
        idx = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=generator).to(x.device)
        loss = F.mse_loss(block_output(block, x[idx].float()), y[idx].float()) / scale
        losses.append(optimizer_step(opt, loss, params, masks))
        if step % check_every == 0 or step == steps:
            error = relative_error(block, *held)
            if error < best_error:
                best_error, best_step = error, step
                best = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[n])
    return losses, best_error, best_step


class _Captured:
    """An MoE block's inputs and outputs for every batch of the layer being streamed."""

    def __init__(self):
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def __call__(self, module, args, output) -> None:
        x, y = args[0], output[0] if isinstance(output, tuple) else output
        self.x.append(x.detach().reshape(-1, x.shape[-1]))
        self.y.append(y.detach().reshape(-1, y.shape[-1]))


def _run_layer(layer: torch.nn.Module, block: torch.nn.Module | None, store: HiddenStore, calls: list[dict]) -> _Captured:
    """Every batch through `layer` (outputs replace the stored hidden states); captures `block`'s I/O."""
    release_free_memory()  # the previous layer's freed caches go back to the system before this layer's grow
    captured = _Captured()
    handle = block.register_forward_hook(captured) if block is not None else None
    with torch.no_grad():
        for b, call in enumerate(calls):
            out = layer(store.get(b), *call["args"], **call["kwargs"])
            store.put(b, out[0] if isinstance(out, tuple) else out)
    if handle is not None:
        handle.remove()
    return captured


def _meta_model(path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


def local_stage(pairing: Pairing, batches: list[torch.Tensor], held_tokens: int, *, steps: int, lr: float,
                batch_tokens: int, device: torch.device, dtype: torch.dtype, seed: int, inputs: str = "student",
                progress: bool = True, on_layer: LayerSink | None = None, spill_dir: Path | None = None,
                fit=None) -> LocalResult:
    """Fit every touched MoE block of the student; `batches` end with the held-out ones (`held_tokens` tokens).

    Teacher and student are streamed side by side, one decoder layer at a time. inputs="teacher"
    fits block l on the teacher block's inputs and outputs. inputs="student" (sequential fitting)
    feeds the student block the student's own hidden states, which carry the error of every
    layer below, and asks it for what closes the gap to the teacher's layer output:
    target = teacher layer output - (student layer output - student block output).
    inputs="both" trains on the student's pairs and the teacher's (x, y) pairs together (twice the data;
    the held-out tokens stay the student's).
    `on_layer(layer, params)` receives each fitted layer's parameters as soon as it is done (then nothing is
    kept here); hidden states that do not fit the device or RAM go to files in `spill_dir` (default: the
    system's temporary folder), unlinked as soon as they are mapped.
    fit: the block fit (default `_fit`, the whole block; surgery.refine.heal.lora and .expertwise give others).
    """
    spec = pairing.teacher_layout.spec
    touched = set(pairing.touched_layers)
    generator = torch.Generator().manual_seed(seed)
    teacher, t_config = _meta_model(pairing.teacher.dir, dtype)
    student, _ = _meta_model(pairing.student.dir, dtype)
    attach_checkpoint_novices(student, pairing.student, pairing.student_layout)  # zero weights + gated constants
    t_base, t_layers, prefix, text_config = load_frame(teacher, t_config, pairing.teacher, pairing.teacher_layout,
                                                        device, dtype)
    s_base = student.get_decoder() if hasattr(student, "get_decoder") else student.model
    s_layers = decoder_layers(s_base)
    t_blocks = {b.layer: teacher.get_submodule(b.name) for b in find_blocks(teacher, spec)}
    s_blocks = {b.layer: (b.name, student.get_submodule(b.name)) for b in find_blocks(student, spec)}

    total = sum(b.numel() for b in batches) * text_config.hidden_size * torch.empty((), dtype=dtype).element_size()
    spill_dir = spill_dir or Path(tempfile.gettempdir())
    t_store = HiddenStore("auto", device, 2 * total, spill_dir)  # two stores: the teacher's and the student's
    s_store = HiddenStore(t_store.where, device, total, spill_dir)
    calls = record_calls(t_base, t_layers, batches, t_store, device)
    for b in range(len(t_store.items)):
        s_store.put(b, t_store.get(b))  # pruning leaves the embeddings alone
    result = LocalResult()
    # teacher layer i, student layer i, teacher layer i + 1, ...: each read while the one before computes
    jobs = []
    for i, (t_layer, s_layer) in enumerate(zip(t_layers, s_layers)):
        jobs.append((t_layer, f"{prefix}.layers.{i}", pairing.teacher, pairing.teacher_layout, i))
        jobs.append((s_layer, f"{prefix}.layers.{i}", pairing.student, pairing.student_layout, i))
    prefetcher = LayerPrefetcher(None, prefix, None, None, device, jobs=jobs)
    try:
        _walk(result, prefetcher, t_layers, s_layers, t_blocks, s_blocks, t_store, s_store, calls, touched, spec,
              pairing, inputs, held_tokens, steps=steps, lr=lr, batch_tokens=batch_tokens, generator=generator,
              progress=progress, on_layer=on_layer, fit=fit or _fit)
    finally:
        prefetcher.close()
    t_store.close()
    s_store.close()
    return result


def _walk(result: LocalResult, prefetcher: LayerPrefetcher, t_layers, s_layers, t_blocks, s_blocks, t_store, s_store,
          calls, touched, spec, pairing: Pairing, inputs: str, held_tokens: int, *, steps: int, lr: float,
          batch_tokens: int, generator: torch.Generator, progress: bool, on_layer: LayerSink | None,
          fit) -> None:
    """The layer loop of local_stage: teacher layer i, then student layer i (fitted where pruned)."""
    bar = tqdm(total=len(t_layers), desc="Layer-local fit", unit="layer", disable=not progress)
    for i, (t_layer, s_layer) in enumerate(zip(t_layers, s_layers)):
        prefetcher.ready(2 * i)
        fit_here = i in touched
        teacher_io = _run_layer(t_layer, t_blocks.get(i) if fit_here and inputs != "student" else None, t_store, calls[i])
        t_layer.to("meta")
        prefetcher.ready(2 * i + 1)
        if not fit_here:
            _run_layer(s_layer, None, s_store, calls[i])
        else:
            name, block = s_blocks[i]
            student_io = _run_layer(s_layer, block, s_store, calls[i])
            if inputs == "teacher":
                x, y = torch.cat(teacher_io.x), torch.cat(teacher_io.y)
            else:
                x, y, mids, shapes = _sequential_pairs(student_io, s_store, t_store)
                student_x = x.split([m.shape[0] for m in mids])
                if inputs == "both":  # the teacher's own pairs as extra training data; held-out stays the student's
                    n_fit = x.shape[0] - held_tokens
                    x = torch.cat([x[:n_fit], torch.cat(teacher_io.x)[:n_fit], x[n_fit:]])
                    y = torch.cat([y[:n_fit], torch.cat(teacher_io.y)[:n_fit], y[n_fit:]])
            trained: dict[str, torch.Tensor] = {}
            result.layers[i] = fit(block, name, spec.router_module, pairing.sparsified, x, y, held_tokens,
                                   steps=steps, lr=lr, batch_tokens=batch_tokens, generator=generator,
                                   params_out=trained)
            if on_layer is not None:
                on_layer(i, trained)
            else:
                result.params.update({n: v.to("cpu") for n, v in trained.items()})
            del trained
            if inputs != "teacher":  # the student's next layer sees the healed block's output
                with torch.no_grad():
                    for b, (xb, m) in enumerate(zip(student_x, mids)):
                        s_store.put(b, (m + block_output(block, xb).to(m.dtype)).reshape(shapes[b]))
            done = result.layers[i]
            bar.set_postfix(layer=i, error=f"{done['held_out_error_before']:.3f}->{done['held_out_error_after']:.3f}"
                                           + (" (start kept: held-out error rose)" if done.get("best_step") == 0 else ""))
        s_layer.to("meta")
        bar.update(1)
    bar.close()


def _sequential_pairs(student_io: _Captured, s_store: HiddenStore, t_store: HiddenStore
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Size]]:
    """(x, y, mids, shapes) for inputs="student": x the student block's inputs, y what the block must add to
    the student's mid-layer residual (`mids`, per batch) to reach the teacher's layer output; `shapes` the
    stored hidden states' shapes. The captured lists are emptied as they are used and y is filled in place,
    so at most one extra copy of the cached tokens exists at a time (this cache is most of the refit's memory)."""
    shapes = [s_store.get(b).shape for b in range(len(student_io.y))]
    mids = [s_store.get(b).reshape(f.shape) - f for b, f in enumerate(student_io.y)]
    student_io.y.clear()
    release_free_memory()
    x = torch.cat(student_io.x)
    student_io.x.clear()
    y = torch.empty_like(x)
    start = 0
    for b, m in enumerate(mids):
        torch.sub(t_store.get(b).reshape(m.shape), m, out=y[start:start + m.shape[0]])
        start += m.shape[0]
    release_free_memory()
    return x, y, mids, shapes


def _fit(block: torch.nn.Module, name: str, router_module: str, sparsified: bool, x: torch.Tensor, y: torch.Tensor,
         held_tokens: int, *, steps: int, lr: float, batch_tokens: int, generator: torch.Generator,
         params_out: dict[str, torch.Tensor]) -> dict:
    """Train the block's router and experts in float32 on all but the last `held_tokens` tokens, ending
    in the state with the lowest held-out error (the untouched block if none is lower).
    Trained values go to `params_out`."""
    dtype = next(block.parameters()).dtype
    block.float()
    params = trainable(block, router_module)
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    masks = masks_of(params, sparsified)
    n_fit = x.shape[0] - held_tokens
    held = (x[n_fit:], y[n_fit:])
    before = relative_error(block, *held)
    with torch.enable_grad():
        losses, after, best_step = fit_block(block, params, masks, x[:n_fit], y[:n_fit], held, steps=steps, lr=lr,
                                             batch_tokens=batch_tokens, generator=generator)
    with torch.no_grad():
        # stays on the device: the receiver moves one tensor at a time to the host (a layer's float32 copy is
        # most of heal's host memory otherwise)
        params_out.update({f"{name}.{n}": p.detach().clone() for n, p in params.items()})
        for p in block.parameters():
            p.requires_grad_(False)
    block.to(dtype)
    return {"held_out_error_before": before, "held_out_error_after": after, "best_step": best_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "steps": steps, "tokens": int(n_fit)}
