"""`sparsify -d DATA` (with `--sequential` and/or `--method sparsegpt`): the statistics come from a
calibration pass run here, one decoder layer at a time, instead of a statistics file.

Layer i is loaded, every calibration batch goes through it while each expert's routed inputs are
summed (moe-pruner: sum_t r g^2 x_c^2 per input channel; wanda: sum_t r x_c^2; sparsegpt: the full
H = sum_t r x x^T; and the same of h, the down projection's input), then the layer's experts are
sparsified in memory (masks.row_mask, or sparsegpt's OBS updates). Without `sequential` the next
layer's inputs are the dense layer's outputs (the statistics of a one-shot `collect`); with it they
are the sparsified layer's outputs, so every layer is scored on inputs that already went through the
sparsified layers below it: MoE-Pruner's layer-wise procedure (fusion_bench's `moe_pruner`), and the
reference SparseGPT's. The sparsified expert weights are held in host memory in their on-disk dtype
until the output is written; every other tensor is copied byte for byte.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from surgery.architectures import MoELayout, resolve
from surgery.collect.gradients import expert_matrices
from surgery.collect.options import CollectOptions
from surgery.collect.run import pick_device, pick_dtype
from surgery.io import Checkpoint, TensorInfo, provenance
from surgery.io.derived import DerivedCheckpoint, as_output
from surgery.model.blocks import find_blocks
from surgery.model.expert_math import expert_forward
from surgery.model.streaming import HiddenStore, load_frame, load_params, record_calls
from surgery.refine.heal.export import TORCH_DTYPES, disk_tensors, to_bytes
from surgery.refine.sparsify.masks import SparsifyError, check_sparsity, row_mask
from surgery.refine.sparsify.sparsegpt import sparsegpt
from surgery.refine.sparsify.targets import find_targets

CALIBRATED_METHODS = ("moe-pruner", "wanda", "sparsegpt")


class _Capture:
    """Sums over one layer's routed tokens, per expert: [E, C] channel sums or [E, C, C] Hessians, for x
    (gate/up inputs) and h (down inputs). Wraps the experts module's forward, which it leaves unchanged."""

    def __init__(self, experts: torch.nn.Module, spec, method: str, device):
        self.experts, self.kind, self.method = experts, spec.expert_math, method
        (first, axis), (down, down_axis) = expert_matrices(experts, spec)
        num, sizes = first.shape[0], (first.shape[axis], down.shape[3 - down_axis])
        self.dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        shape = (lambda c: (num, c, c)) if method == "sparsegpt" else (lambda c: (num, c))
        self.sums = {side: torch.zeros(shape(c), dtype=self.dtype, device=device) for side, c in zip(("in", "inter"), sizes)}
        self.count = torch.zeros(num, dtype=torch.long)
        self.original = experts.forward
        experts.forward = self

    def __call__(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        for e in top_k_index.unique().tolist():
            rows, slot = (top_k_index == e).nonzero(as_tuple=True)
            xe = x[rows]
            h = expert_forward(self.experts, self.kind, e, xe)[0]
            gate = top_k_weights[rows, slot].to(self.dtype)[:, None]
            for side, v in (("in", xe.to(self.dtype)), ("inter", h.to(self.dtype))):
                if self.method == "sparsegpt":
                    self.sums[side][e] += v.T @ v
                else:
                    self.sums[side][e] += ((gate * v) ** 2 if self.method == "moe-pruner" else v * v).sum(0)
            self.count[e] += rows.numel()
        return self.original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    def restore(self) -> None:
        self.experts.forward = self.original


def _sparsified(weight: torch.Tensor, sums: torch.Tensor, count: torch.Tensor, method: str, sparsity: float,
                pattern: str) -> torch.Tensor:
    """New weights [E, out, in] (float32): sparsegpt's, or each expert masked by |W| x sqrt(channel sums)
    (magnitude for an expert no token reached, as `sparsify` with a statistics file)."""
    if method == "sparsegpt":
        return sparsegpt(weight, sums, sparsity, pattern)
    w = weight.detach().float().cpu().clone()
    norms = sums.sqrt().float().cpu().numpy()
    for e in range(w.shape[0]):
        keep = row_mask(w[e].numpy(), norms[e] if count[e] else None, sparsity, pattern)
        w[e][torch.from_numpy(~keep)] = 0.0
    return w


def _prune_layer(capture: _Capture, experts_name: str, spec, method: str, sparsity: float,
                 pattern: str) -> dict[str, torch.Tensor]:
    """Sparsify the layer's fused expert matrices in place; returns {in-memory name: new value (CPU float32)}."""
    out = {}
    names = {id(p): n for n, p in capture.experts.named_parameters()}
    for side, (param, hidden_axis) in zip(("in", "inter"), expert_matrices(capture.experts, spec)):
        input_axis = hidden_axis if side == "in" else 3 - hidden_axis
        weight = param.data if input_axis == 2 else param.data.transpose(1, 2)
        new = _sparsified(weight, capture.sums[side], capture.count, method, sparsity, pattern)
        new = new if input_axis == 2 else new.transpose(1, 2)
        param.data.copy_(new.to(param.device, param.dtype))
        out[f"{experts_name}.{names[id(param)]}"] = param.data.detach().to("cpu", torch.float32)
    return out


def _batches(model_dir: Path, layout: MoELayout, data: list[str], options: CollectOptions) -> list[torch.Tensor]:
    from surgery.model.data import build_sequences, cap_seq_len
    from surgery.model.load import load_tokenizer

    seq_len = cap_seq_len(layout.config, options.seq_len)
    ids = build_sequences(data, load_tokenizer(model_dir), options.samples, seq_len, options.seed,
                          options.sampling).input_ids
    return list(ids.split(options.batch_size))


def _walk(ckpt: Checkpoint, layout: MoELayout, batches: list[torch.Tensor], options: CollectOptions,
          on_layer: Callable[[int, dict[str, torch.Tensor]], None], method: str, sequential: bool, sparsity: float,
          pattern: str, spill_dir: Path) -> dict[int, list[int]]:
    """Every batch through the model one layer at a time, each MoE layer sparsified after its pass
    (`on_layer(layer, new values)`); returns the experts no token reached, per layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.model.weights import plain_config

    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    config = plain_config(AutoConfig.from_pretrained(ckpt.dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    base, layers, prefix, text_config = load_frame(model, config, ckpt, layout, device, dtype)
    blocks = {b.layer: b for b in find_blocks(model, layout.spec)}
    size = sum(b.numel() for b in batches) * text_config.hidden_size * torch.empty((), dtype=dtype).element_size()
    store = HiddenStore(options.hidden_states, device, size, spill_dir)
    calls = record_calls(base, layers, batches, store, device)
    unrouted: dict[int, list[int]] = {}
    bar = tqdm(total=len(layers), desc="Sparsifying layers", disable=not options.progress)
    for i, layer in enumerate(layers):
        load_params(layer, f"{prefix}.layers.{i}", ckpt, layout, i, device, dtype)
        block = blocks.get(i)
        capture = None
        if block is not None:
            capture = _Capture(block.experts, layout.spec, method, device)
        _run_layer(layer, calls[i], store, put=capture is None or not sequential)
        if capture is not None:
            capture.restore()
            name = next(n for n, m in model.named_modules() if m is block.experts)
            on_layer(i, _prune_layer(capture, name, layout.spec, method, sparsity, pattern))
            unrouted[i] = [e for e in range(capture.count.numel()) if not capture.count[e]]
            if sequential:
                _run_layer(layer, calls[i], store, put=True)
        layer.to("meta")
        bar.update(1)
    bar.close()
    store.close()
    return unrouted


def _run_layer(layer: torch.nn.Module, calls: list[dict], store: HiddenStore, put: bool) -> None:
    """Every batch through one layer; `put`: its outputs replace the inputs (they feed the next layer)."""
    with torch.no_grad():
        for b, call in enumerate(calls):
            out = layer(store.get(b), *call["args"], **call["kwargs"])
            if put:
                store.put(b, out[0] if isinstance(out, tuple) else out)


def calibrated_sparsify(model_dir: str | Path, data: list[str], out_dir: str | Path | DerivedCheckpoint, *,
                        calibration: CollectOptions, sequential: bool, sparsity: float | None,
                        pattern: str = "unstructured", method: str = "moe-pruner", overwrite: bool = False) -> dict:
    """Write a copy of `model_dir` with its routed experts sparsified from a calibration pass over `data`;
    returns pruning.json's sparsity section."""
    if method not in CALIBRATED_METHODS:
        raise SparsifyError(f"method {method!r} does not read calibration text; choose from "
                            f"{', '.join(CALIBRATED_METHODS)}")
    sparsity = check_sparsity(sparsity, pattern)
    with Checkpoint(model_dir) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        out = as_output(out_dir, overwrite, [ckpt.dir])
        targets = find_targets(ckpt, layout, sorted(layout.layers), include_shared=False)
        batches = _batches(ckpt.dir, layout, list(data), calibration)
        written: dict[str, bytes] = {}
        zeros: dict[str, int] = {}

        def keep(layer: int, values: dict[str, torch.Tensor]) -> None:
            for name, value in disk_tensors(ckpt, layout, values).items():
                stored = value.to(TORCH_DTYPES[ckpt.info(name).dtype])
                zeros[name] = int((stored == 0).sum())
                written[name] = to_bytes(stored, ckpt.info(name).dtype)

        with out:
            with tempfile.TemporaryDirectory(prefix=".sparsify-", dir=out.tmp.resolve()) as spill:
                unrouted = _walk(ckpt, layout, batches, calibration, keep, method, sequential, sparsity, pattern,
                                 Path(spill))
            missing = sorted(set(targets) - set(written))
            if missing:
                raise SparsifyError(f"{ckpt.dir}: no sparsified value for {missing[0]} (the model's experts module "
                                    "does not cover every stored expert tensor)")

            def produce(info: TensorInfo):
                return iter([written.pop(info.name)]) if info.name in written else None

            out.replace_tensors(ckpt, produce)
            section = _section(ckpt, targets, zeros, unrouted, data, calibration, method=method, pattern=pattern,
                               sparsity=sparsity, sequential=sequential)
            doc = provenance.read(ckpt.dir) or {**provenance.header({"path": str(ckpt.dir.resolve())}),
                                                "model_type": layout.spec.model_type}
            out.finish(ckpt, {**doc, "sparsity": section})
    return section


def _section(ckpt: Checkpoint, targets: dict, zeros: dict[str, int], unrouted: dict[int, list[int]], data: list[str],
             calibration: CollectOptions, **options) -> dict:
    sizes = {name: int(np.prod(ckpt.info(name).shape)) for name in targets}
    score = "OBS (sparsegpt), H = sum_t r x x^T" if options["method"] == "sparsegpt" else options["method"]
    return {
        **options,
        "include_shared": False,
        "layers": sorted({t.layer for t in targets.values()}),
        "comparison_group": "block of 128 inputs" if options["method"] == "sparsegpt" else "output row",
        "created": provenance.now(),
        "stats": None,
        "calibration": {"sources": [str(p) for p in data], "samples": calibration.samples,
                        "seq_len": calibration.seq_len, "seed": calibration.seed, "sampling": calibration.sampling},
        "unrouted_experts_magnitude": {str(k): v for k, v in sorted(unrouted.items()) if v},
        "achieved": sum(zeros.values()) / max(1, sum(sizes.values())),
        "tensors": {name: {"achieved": zeros[name] / sizes[name], "input_axis": t.input_axis, "score": score}
                    for name, t in sorted(targets.items())},
    }
