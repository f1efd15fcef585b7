"""`collect --gradients`: per-sequence gradients of every expert's matrices, reduced to mergeable sums.

MC-Suite's gradient signals (arXiv 2504.05586, Sec. 2.5) are nonlinear functions of an expert's
gradient (cosines, norms, standard deviations, outlier counts). A nonlinear function of a gradient
summed over data shards cannot be merged from the shards' values, and keeping the summed gradient
itself would make the statistics file as large as the experts. So the unit is the calibration
sequence: for each sequence s we take G_{s,i} = dL_s/dW_i, the gradient of its summed next-token
cross-entropy with respect to expert i's gate, up and down matrices, and add its statistics
(stats_formats.schema.GRADIENT_FIELDS) over sequences. Sums over sequences do not depend on batches,
ranks or data shards, so torchrun and `stats merge` are exact.

`--gradients accumulated` is the paper's own form (Sec. 2.5): the gradients of all sequences are added
first, G_i = sum_s G_{s,i} (the gradient of the whole calibration set's summed loss), and the same fields
are taken of G_i once, as of a single sequence, so every criterion gives the paper's formula. One MoE
layer's G_i is as large as its experts: with --stream-layers only the layer being walked holds one (during
its step of the backward walk); with the model in memory every layer's is held beside the model until
the pass ends. Under torchrun G_i is all-reduced before its statistics are taken, so it stays exact. A file of it cannot be merged with another
(stats_formats.merge refuses).

Two ways to get G_{s,i}, both plain autograd on one sequence at a time (parameters are never changed):
the whole model in memory (`gradient_pass`), or one decoder layer at a time (`stream_gradients`):
a forward sweep keeps every layer's inputs (HiddenStore: accelerator, RAM or disk), the loss is
taken at the top, then the layers are walked backwards, each recomputed with grad enabled to give
its experts' gradients and the gradient of its input, which is passed down.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stats_formats.schema import GRADIENT_FIELDS, field_shape

from surgery.architectures import ArchSpec, MoELayout
from surgery.io import Checkpoint
from surgery.model.blocks import MoEBlock, find_blocks
from surgery.collect.hooks import SelfCheckError
from surgery.collect.progressive import RouterMask
from surgery.model.streaming import HiddenStore, load_frame, load_params, record_calls

OUTLIER_SIGMAS = 3.0  # MC-Suite's c
FORMS = ("per-sequence", "accumulated")  # `collect --gradients FORM`; recorded as calibration.gradients

Matrices = list[tuple[torch.nn.Parameter, int]]  # (fused expert matrix [E, a, b], its hidden axis)


def expert_matrices(experts: torch.nn.Module, spec: ArchSpec) -> Matrices:
    """Each fused matrix of the in-memory expert layout (ArchSpec.math.matrices) and its hidden-size axis."""
    if not spec.math.matrices:
        raise SelfCheckError(f"collect --gradients does not support {spec.model_type} (expert formula {spec.expert_math!r})")
    return [(getattr(experts, name), axis) for name, axis in spec.math.matrices]


class GradientSums:
    """Float64 sums of the gradient fields for one MoE layer, one sequence's gradients at a time; with
    `accumulated`, the sequences' gradients are summed first and `finish` takes the fields of the sum."""

    def __init__(self, matrices: Matrices, device: torch.device, accumulated: bool = False):
        (first, axis), (down, down_axis) = matrices
        num_experts, hidden, inter = first.shape[0], first.shape[axis], down.shape[3 - down_axis]
        self.device = torch.device(device)
        self.cd = torch.float64 if self.device.type == "cpu" else torch.float32  # as in LayerAccumulator
        self.accumulated = accumulated
        self.total: list[tuple[torch.Tensor, int]] | None = None  # sum_s G_{s,i} while accumulating
        self.shapes = [(p.shape, axis) for p, axis in matrices]
        self.sums = {f.name: torch.zeros(field_shape(f.name, num_experts, hidden, inter), dtype=torch.float64,
                                         device=self.device) for f in GRADIENT_FIELDS}

    def add(self, grads: list[tuple[torch.Tensor, int]]) -> None:
        """G_{s,i} of one sequence, as (gradient of a fused matrix [E, a, b], its hidden axis) pairs."""
        if not self.accumulated:
            self._add_fields(grads)
        elif self.total is None:
            self.total = [(g.to(self.cd).clone(), axis) for g, axis in grads]
        else:
            for (t, _), (g, _) in zip(self.total, grads):
                t += g.to(self.cd)

    def finish(self) -> None:
        """After the last sequence: combine across torch.distributed ranks (the fields for per-sequence
        sums; the summed gradient itself when accumulated, whose fields are then taken once, on every rank)."""
        import torch.distributed as dist

        if not self.accumulated:
            if dist.is_initialized():
                for t in self.sums.values():
                    dist.all_reduce(t)
            return
        total = self.total or [(torch.zeros(shape, dtype=self.cd, device=self.device), axis)
                               for shape, axis in self.shapes]  # a rank without sequences adds zeros
        if dist.is_initialized():
            for t, _ in total:
                dist.all_reduce(t)
        self._add_fields(total)
        self.total = None

    def _add_fields(self, grads: list[tuple[torch.Tensor, int]]) -> None:
        s, cd = self.sums, self.cd
        gram = torch.zeros_like(s["grad_gram"], dtype=cd)
        hidden_sum = torch.zeros_like(s["grad_hidden_sum"], dtype=cd)
        hidden_sq = torch.zeros_like(hidden_sum)
        for g, axis in grads:
            m = g.to(cd)
            flat = m.reshape(m.shape[0], -1)
            gram += flat @ flat.T
            hidden_sum += m.sum(3 - axis)
            hidden_sq += (m * m).sum(3 - axis)
            s["grad_hidden_count"] += m.shape[3 - axis]
        s["grad_gram"] += gram.double()
        s["grad_hidden_sum"] += hidden_sum.double()
        s["grad_hidden_sq_sum"] += hidden_sq.double()
        s["grad_outliers"] += self._outliers(grads, hidden_sum.sum(1), hidden_sq.sum(1)).double()

    def _outliers(self, grads: list[tuple[torch.Tensor, int]], total: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
        """Per expert, entries beyond mean ± 3 std (population) of all its entries in this sequence."""
        entries = float(sum(g[0].numel() for g, _ in grads))
        mean = total / entries
        bound = OUTLIER_SIGMAS * (total_sq / entries - mean * mean).clamp_min(0).sqrt()
        return sum(((g.to(self.cd) - mean[:, None, None]).abs() > bound[:, None, None]).sum((1, 2)) for g, _ in grads)


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sequence [1, T]: the sequences' gradients add up to the total loss's."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")


def _sequences(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [row[None] for b in batches for row in b]


@contextlib.contextmanager
def _only_these_require_grad(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Autograd records only what leads to the expert matrices; the flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_pass(model: torch.nn.Module, spec: ArchSpec, batches: list[torch.Tensor], device: torch.device,
                  progress: bool, form: str = "per-sequence") -> dict[int, GradientSums]:
    """Gradient statistics of every MoE layer of a model held in memory, one sequence at a time (`form`: FORMS)."""
    matrices = {b.layer: expert_matrices(b.experts, spec) for b in find_blocks(model, spec)}
    sums = {layer: GradientSums(mats, device, form == "accumulated") for layer, mats in matrices.items()}
    params = [p for mats in matrices.values() for p, _ in mats]
    with _only_these_require_grad(model, params), torch.enable_grad():
        for ids in tqdm(_sequences(batches), desc="Gradients", unit="seq", disable=not progress):
            ids = ids.to(device)
            grads = iter(torch.autograd.grad(sequence_loss(model(input_ids=ids, use_cache=False).logits, ids), params))
            for layer, mats in matrices.items():
                sums[layer].add([(next(grads), axis) for _, axis in mats])
    for layer_sums in sums.values():
        layer_sums.finish()
    return sums


# ---------------------------------------------------------------------------------------------
# One decoder layer at a time


def stream_gradients(model_dir: str, config, layout: MoELayout, batches: list[torch.Tensor], device, dtype,
                     masked: dict[int, list[int]], hidden_states: str = "auto", spill_dir: Path | None = None,
                     progress: bool = True, form: str = "per-sequence") -> dict[int, GradientSums]:
    """Gradient statistics with one decoder layer in memory: forward sweep, loss at the top, backward walk."""
    from transformers import AutoModelForCausalLM

    sequences = _sequences(batches)
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    RouterMask(model, layout.spec, masked)  # the streamed model is discarded afterwards: nothing to restore
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    base, layers, prefix, text_config = load_frame(model, config, ckpt, layout, device, dtype)
    _load_head(model, ckpt, layout, device, dtype, tied)
    blocks = {b.layer: b for b in find_blocks(model, layout.spec)}
    sums = {layer: GradientSums(expert_matrices(b.experts, layout.spec), device, form == "accumulated")
            for layer, b in blocks.items()}
    elem = torch.empty((), dtype=dtype).element_size()
    size = sum(ids.numel() for ids in sequences) * text_config.hidden_size * elem

    def store() -> HiddenStore:
        return HiddenStore(hidden_states, torch.device(device), size, spill_dir or Path(tempfile.gettempdir()))

    def load(i: int) -> None:
        load_params(layers[i], f"{prefix}.layers.{i}", ckpt, layout, i, device, dtype)

    first = min(blocks)
    bar = tqdm(total=(2 * len(layers) - first) * len(sequences), desc="Gradients (layers × sequences)",
               disable=not progress)
    inputs = store()
    calls = record_calls(base, layers, sequences, inputs, device)
    kept, final = _forward_sweep(layers, calls, inputs, first, load, store, bar)
    upstream = _top_gradients(model, layers, sequences, final, store(), device)
    final.close()
    for i in reversed(range(first, len(layers))):  # backward walk
        load(i)
        below = store() if i > first else None
        _backward_layer(layers[i], calls[i], kept.pop(i), upstream, below, sums.get(i), blocks.get(i), layout.spec, bar)
        layers[i].to("meta")
        upstream.close()
        upstream = below
    bar.close()
    ckpt.close()
    return sums


def _forward_sweep(layers: torch.nn.ModuleList, calls: list[list[dict]], inputs: HiddenStore, first: int,
                   load: Callable[[int], None], store: Callable[[], HiddenStore],
                   bar: tqdm) -> tuple[dict[int, HiddenStore], HiddenStore]:
    """Every sequence through every layer; returns the inputs of layers `first`.. (the backward walk
    recomputes them) and the last layer's outputs."""
    kept: dict[int, HiddenStore] = {}
    for i, layer in enumerate(layers):
        load(i)
        outputs = store()
        with torch.no_grad():
            for s, call in enumerate(calls[i]):
                outputs.put(s, _output(layer(inputs.get(s), *call["args"], **call["kwargs"])))
                bar.update(1)
        layer.to("meta")
        if i >= first:
            kept[i] = inputs
        else:
            inputs.close()
        inputs = outputs
    return kept, inputs


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _load_head(model: torch.nn.Module, ckpt: Checkpoint, layout: MoELayout, device, dtype, tied: bool) -> None:
    """The output embedding (lm_head) lives outside the decoder; a tied one shares the loaded input embedding."""
    head = model.get_output_embeddings()
    if tied:
        head.weight = model.get_input_embeddings().weight
        return
    name = next(n for n, m in model.named_modules() if m is head)
    load_params(head, name, ckpt, layout, None, device, dtype)


def _top_gradients(model: torch.nn.Module, layers: torch.nn.ModuleList, sequences: list[torch.Tensor],
                   final: HiddenStore, out: HiddenStore, device) -> HiddenStore:
    """dL_s/d(last layer's output) for every sequence, through the model's own top (norm, lm_head, any
    logit scaling): the model runs with layer 0 returning the stored final hidden states, the others identity."""
    feed: dict[str, torch.Tensor] = {}
    originals = [layer.forward for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = (lambda hidden_states, *a, **k: feed["h"]) if i == 0 else (lambda hidden_states, *a, **k: hidden_states)
    try:
        with torch.enable_grad():
            for s, ids in enumerate(sequences):
                feed["h"] = h = final.get(s).detach().requires_grad_(True)
                ids = ids.to(device)
                out.put(s, torch.autograd.grad(sequence_loss(model(input_ids=ids, use_cache=False).logits, ids), h)[0])
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd
    return out


def _backward_layer(layer: torch.nn.Module, calls: list[dict], inputs: HiddenStore, upstream: HiddenStore,
                    below: HiddenStore | None, sums: GradientSums | None, block: MoEBlock | None, spec: ArchSpec,
                    bar: tqdm) -> None:
    """Recompute one layer per sequence with grad enabled: its experts' gradients go to `sums`, the
    gradient of its input to `below` (None at the lowest MoE layer, where the walk stops)."""
    mats = expert_matrices(block.experts, spec) if block is not None else []
    for p, _ in mats:
        p.requires_grad_(True)
    for s, call in enumerate(calls):
        x = inputs.get(s).detach().requires_grad_(below is not None)
        with torch.enable_grad():
            out = _output(layer(x, *call["args"], **call["kwargs"]))
            wrt = ([x] if below is not None else []) + [p for p, _ in mats]
            grads = list(torch.autograd.grad(out, wrt, grad_outputs=upstream.get(s)))
        if below is not None:
            below.put(s, grads.pop(0))
        if sums is not None:
            sums.add([(g, axis) for g, (_, axis) in zip(grads, mats)])
        bar.update(1)
    if sums is not None:
        sums.finish()  # while this layer's summed gradient is the only one held
    inputs.close()
