"""Load a MoNE novice checkpoint (`approximate_experts` + `approx_value` tensors) with transformers.

transformers has no support for this vLLM format, and its per-expert → fused conversion fails on
a layer whose pruned experts have no weights. So `load_model` stages a folder of links to the
checkpoint plus one shard of zero weights for the novices, loads that with `from_pretrained` (all of
transformers' own conversions apply), and adds a forward hook to each affected experts module that
adds Σ_k g_k·mu[id_k] over the routed slots that name a novice. A zero-weight expert outputs exactly
zero, so every listed expert contributes `g_i(x)·mu_i` and the others are untouched.

The hook sits on the module call, not on `forward`: the collector (`surgery.collect.hooks`)
replaces `forward` and still gets the novice outputs downstream, but records the novices' own
outputs f_i as zero (their weights), not mu_i.

Usage: `from surgery.model import load_model; model = load_model("pruned-novices")`;
`moe-surgery eval` and `collect` call it for every checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from surgery.architectures import MoELayout, resolve
from surgery.model.blocks import find_blocks
from surgery.errors import UserError
from surgery.io import INDEX_NAME, Checkpoint
from surgery.io.novice_format import CONFIG_KEY, VALUE_SUFFIX, novice_experts, value_name

_log = logging.getLogger(__name__)
ZEROS_SHARD = "moe-surgery-novice-zeros.safetensors"
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_novice_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local folder whose config.json lists novices."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and bool(novice_experts(json.loads(cfg.read_text())))


def load_novice_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """A causal LM in eval mode on `device`; novice experts return g_i(x)·mu_i (dtype from config unless given)."""
    path = Path(path)
    if not is_novice_checkpoint(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval().to(device)
    ckpt = Checkpoint(path)
    try:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
        novices = novice_experts(ckpt.config)
        values = _novice_values(ckpt, layout, novices)
        with tempfile.TemporaryDirectory(prefix="moe-surgery-novices-") as tmp:
            _stage(ckpt, layout, novices, Path(tmp))
            model = _from_staged(Path(tmp), ckpt.dir, dtype)
    finally:
        ckpt.close()
    attach_novices(model, layout, values)
    return model.eval().to(device)


def _from_staged(folder: Path, source: Path, dtype: str | torch.dtype | None):
    """from_pretrained on the staged folder. Its load report would list every approx_value as
    unexpected, so the report is muted and checked here instead: a missing key would be random."""
    from transformers import AutoModelForCausalLM

    report = logging.getLogger("transformers.modeling_utils")
    mute = _MuteLoadReport()
    report.addFilter(mute)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", output_loading_info=True)
    finally:
        report.removeFilter(mute)
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise UserError(f"{source}: transformers could not load {len(bad)} weights of this novice checkpoint, e.g. {bad[0]}")
    other = sorted(k for k in info["unexpected_keys"] if not k.endswith(VALUE_SUFFIX))
    if other:
        _log.warning("%s: %d unused weights, e.g. %s", source, len(other), other[0])
    return model


class _MuteLoadReport(logging.Filter):
    """Drops transformers' load report (a level change instead would switch on its TP-plan warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _novice_values(ckpt: Checkpoint, layout: MoELayout, novices: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Per layer, an [E + 1, H] float32 table: mu for novices, zero rows for real experts and for the
    id E that some routers use to mark an empty slot."""
    from safetensors import safe_open

    tables = {}
    for layer, ids in novices.items():
        if layer not in layout.layers:
            raise UserError(f"{ckpt.config_path}: {CONFIG_KEY} names layer {layer}, which has no experts")
        rows = {}
        for i in ids:
            name = value_name(layout, layer, i)
            if name not in ckpt.weight_map:
                raise UserError(f"{ckpt.dir}: {CONFIG_KEY} lists expert {i} of layer {layer} but {name} is missing")
            with safe_open(ckpt.dir / ckpt.weight_map[name], "pt") as f:
                rows[i] = f.get_tensor(name).float()
        table = torch.zeros(layout.num_experts + 1, next(iter(rows.values())).shape[0])
        for i, mu in rows.items():
            table[i] = mu
        tables[layer] = table
    return tables


def _stage(ckpt: Checkpoint, layout: MoELayout, novices: dict[int, list[int]], tmp: Path) -> None:
    """Links to every file of the checkpoint, a shard of zero weights named like each novice's missing
    tensors (shapes and dtypes of a real expert of the same layer), and an index naming both."""
    from safetensors.torch import save_file

    for src in ckpt.dir.iterdir():
        if src.name != INDEX_NAME:
            (tmp / src.name).symlink_to(src.resolve())
    zeros = {}
    for layer, ids in novices.items():
        entry = layout.layers[layer]
        real = [i for i, names in entry.per_expert.items() if not all(n.endswith(VALUE_SUFFIX) for n in names)]
        if not real:
            raise UserError(f"{ckpt.dir}: layer {layer} has no expert weights left to copy the shapes from")
        template = f"{entry.prefix}.experts.{real[0]}."
        for name in entry.per_expert[real[0]]:
            info = ckpt.info(name)
            for i in ids:
                zeros[f"{entry.prefix}.experts.{i}." + name[len(template):]] = torch.zeros(
                    info.shape, dtype=_TORCH_DTYPES[info.dtype])
    save_file(zeros, tmp / ZEROS_SHARD, metadata={"format": "pt"})
    weight_map = {n: s for n, s in ckpt.weight_map.items() if not n.endswith(VALUE_SUFFIX)}
    weight_map.update({n: ZEROS_SHARD for n in zeros})
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))


def attach_checkpoint_novices(model: torch.nn.Module, ckpt: Checkpoint, layout: MoELayout) -> None:
    """For models built from config and filled by streaming (surgery.model.weights gives novices zero weights):
    hook the novices of `ckpt`, if it has any, onto `model`'s experts modules."""
    novices = novice_experts(ckpt.config, str(ckpt.config_path))
    if novices:
        attach_novices(model, layout, _novice_values(ckpt, layout, novices))


def attach_novices(model: torch.nn.Module, layout: MoELayout, tables: dict[int, torch.Tensor]) -> None:
    """Hook each experts module with novices so its output gains Σ_k g_k·table[id_k]."""
    blocks = {b.layer: b for b in find_blocks(model, layout.spec)}
    for layer, table in tables.items():
        if layer not in blocks:
            raise UserError(f"{CONFIG_KEY} names layer {layer}, but the loaded model has no MoE block there")
        blocks[layer].experts.register_forward_hook(_NoviceHook(table), with_kwargs=True)


class _NoviceHook:
    """Adds the novices' gated constants to an experts module's output (computed in float32, as vLLM does)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.num_experts = table.shape[0] - 1

    def __call__(self, module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        idx = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
        w = kwargs["top_k_weights"] if "top_k_weights" in kwargs else args[2]
        if self.table.device != output.device:
            self.table = self.table.to(output.device)
        rows = self.table[idx.clamp(0, self.num_experts)]  # [T, k, H]
        add = torch.bmm(w.float().reshape(idx.shape)[:, None, :], rows)[:, 0]
        return output + add.to(output.dtype)
