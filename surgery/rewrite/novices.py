"""Pruned experts → MoNE "novices": constant vectors in the checkpoint format vLLM serves.

MoNE (arXiv 2507.00390) replaces each pruned expert i by its mean output mu_i = Σ f_i / n_i over the
calibration tokens routed to it, so a token routed there gets g_i(x)·mu_i instead of nothing.
Routing is unchanged: the router keeps all E rows and config.json keeps E.

On-disk format read by vLLM (`model_executor/layers/fused_moe/expert_substitution.py` and
`models/expert_substitution.py`):
- `approximate_experts: {"<layer>": [expert ids]}` in the HF config. vLLM looks in `hf_text_config`
  first, then `hf_config`, so the key goes in the sub-config the registry's `config_path` names
  (`text_config` for qwen3_vl_moe), next to the expert count;
- one `<experts prefix>.<expert id>.approx_value` tensor of shape [H] per novice, e.g.
  `model.layers.3.mlp.experts.17.approx_value`; vLLM takes the layer from the only integer in the
  experts prefix;
- retained experts keep their logical names and ids (no renumbering).
vLLM refuses substitution with quantized MoE weights and router-weight-on-input models (Llama 4),
and loads retained experts by per-expert names only, so those checkpoints are refused here.
MTP layers stay whole: vLLM maps `mtp.layers.0` to decoder layer 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.architectures import MoELayout, sub_config
from surgery.errors import UserError
from surgery.io import Checkpoint, OutTensor, nbytes, provenance
from surgery.io.derived import DerivedCheckpoint, as_output
from surgery.io.novice_format import CONFIG_KEY, value_name
from surgery.plan import Plan
from surgery.rewrite.experts import layout_record, source_layout

FLOAT_DTYPES = ("F32", "F16", "BF16")


class NoviceError(UserError):
    """The checkpoint, plan or statistics cannot make a novice checkpoint."""


@dataclass
class NovicePlan:
    """Novices per MoE layer, their mean-output vectors (float32 [n, H]) and which had no tokens."""

    novices: dict[int, list[int]]
    values: dict[int, np.ndarray]
    unrouted: dict[int, list[int]]


def novice_ids(layout: MoELayout, keep: Mapping[int, Sequence[int]], where: str) -> dict[int, list[int]]:
    """Experts each planned layer drops; layers not in the plan keep every expert."""
    e = layout.num_experts
    out: dict[int, list[int]] = {}
    for layer, ids in sorted(keep.items()):
        if layer not in layout.layers:
            raise NoviceError(f"{where}: layer {layer} has no experts (MoE layers: {sorted(layout.layers)})")
        if layer >= layout.num_hidden_layers:
            raise NoviceError(f"{where}: layer {layer} is an MTP layer; novices are written for main layers only")
        bad = sorted(set(ids) - set(range(e)))
        if bad:
            raise NoviceError(f"{where}: layer {layer} names expert ids {bad} outside 0..{e - 1}")
        if not ids:
            raise NoviceError(f"{where}: layer {layer} keeps no expert; vLLM needs at least one real expert per layer")
        dropped = sorted(set(range(e)) - set(ids))
        if dropped:
            out[layer] = dropped
    return out


def check_supported(ckpt: Checkpoint, layout: MoELayout, layers: list[int]) -> None:
    """Refuse what vLLM's expert substitution cannot serve (see the module docstring)."""
    where = str(ckpt.config_path)
    if layout.spec.math.router_scales_input:
        raise NoviceError(f"{where}: {layout.spec.model_type} applies the router weight to the expert input; "
                          "vLLM's expert substitution does not support it, so novices cannot be written")
    if CONFIG_KEY in layout.config or CONFIG_KEY in ckpt.config:
        raise NoviceError(f"{where}: already a novice checkpoint ({CONFIG_KEY} is set); prune the original model")
    if "quantization_config" in ckpt.config or "quantization_config" in layout.config:
        raise NoviceError(f"{where}: quantized checkpoint; vLLM's expert substitution needs unquantized expert weights")
    for layer in layers:
        entry = layout.layers[layer]
        if entry.fused:
            raise NoviceError(
                f"{ckpt.dir}: layer {layer} stores its experts fused ({entry.fused[0]}); novices keep expert ids, "
                "which needs per-expert tensors (re-save with save_original_format=True)"
            )
        for name in (n for ns in entry.per_expert.values() for n in ns):
            dtype = ckpt.info(name).dtype
            if dtype not in FLOAT_DTYPES:
                raise NoviceError(f"{ckpt.dir}: {name} is {dtype}; novices need float expert weights (not quantized)")


def mean_outputs(stats, novices: dict[int, list[int]], hidden: int) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    """mu_i = out_sum[i] / count[i] per novice (float32). An expert never routed during calibration
    gets a zero vector: with no tokens there is no mean, and zero equals plain removal."""
    values: dict[int, np.ndarray] = {}
    unrouted: dict[int, list[int]] = {}
    for layer, ids in novices.items():
        if layer not in stats.layers:
            raise NoviceError(f"{stats.label}: no statistics for MoE layer {layer} (file has layers {stats.layers})")
        out_sum = np.asarray(stats.get(layer, "out_sum"), dtype=np.float64)[ids]
        count = np.asarray(stats.get(layer, "count"), dtype=np.float64)[ids]
        if out_sum.shape[1] != hidden:
            raise NoviceError(f"{stats.label}: out_sum has hidden size {out_sum.shape[1]}, the model {hidden}")
        mu = np.divide(out_sum, count[:, None], out=np.zeros_like(out_sum), where=count[:, None] > 0)
        values[layer] = mu.astype(np.float32)
        unrouted[layer] = [i for i, n in zip(ids, count) if n == 0]
    return values, unrouted


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of float32 `values` in a safetensors float dtype; bf16 rounds to nearest even."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = x.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype("<u2").tobytes()
    raise NoviceError(f"cannot write novice values as {dtype} (supported: {', '.join(FLOAT_DTYPES)})")


def novice_tensors(ckpt: Checkpoint, layout: MoELayout, plan: NovicePlan) -> dict[str, list[OutTensor]]:
    """Per source shard: every tensor except the novices' weights, plus each layer's approx_value
    tensors in the shard of its router, in the dtype of that layer's expert weights."""
    dropped = {n for layer, ids in plan.novices.items() for i in ids for n in layout.layers[layer].per_expert[i]}
    out = {
        shard: [OutTensor(t.name, t.dtype, t.shape, [(f, t.begin, t.end)])
                for t in sorted(f.tensors.values(), key=lambda t: t.begin) if t.name not in dropped]
        for shard, f in ckpt.files.items()
    }
    for layer, ids in plan.novices.items():
        entry = layout.layers[layer]
        dtype = ckpt.info(next(iter(entry.per_expert.values()))[0]).dtype
        shard = ckpt.weight_map[next(iter(entry.router))]
        for i, mu in zip(ids, plan.values[layer]):
            out[shard].append(OutTensor(value_name(layout, layer, i), dtype, mu.shape, data=encode(mu, dtype)))
    return out


def memory(ckpt: Checkpoint, per_shard: dict[str, list[OutTensor]]) -> dict[str, int]:
    """Parameters and tensor bytes before and after; novices cost H values each."""
    before = [ckpt.info(n) for n in ckpt.names()]
    after = [t for ts in per_shard.values() for t in ts]
    novel = [t for t in after if t.data is not None]
    return {
        "params_before": sum(math.prod(t.shape) for t in before),
        "params_after": sum(math.prod(t.shape) for t in after),
        "bytes_before": sum(nbytes(t.dtype, t.shape) for t in before),
        "bytes_after": sum(t.nbytes for t in after),
        "novice_params": sum(math.prod(t.shape) for t in novel),
        "novice_bytes": sum(t.nbytes for t in novel),
    }


def write_novice_checkpoint(
    model_dir: str | Path,
    plan: Plan,
    stats,
    out_dir: str | Path | DerivedCheckpoint,
    *,
    overwrite: bool = False,
    progress: bool = False,
    hash_shards: bool = False,
) -> Path:
    """Write `model_dir` with every expert not in `plan` replaced by its novice vector from `stats`
    (a `stats_formats.StatsFile`), atomically; returns `out_dir`."""
    with Checkpoint(model_dir) as ckpt:
        layout = source_layout(ckpt, NoviceError)
        novices = novice_ids(layout, plan.keep, plan.label)
        if not novices:
            raise NoviceError(f"{plan.label}: removes no expert, so there are no novices to write")
        check_supported(ckpt, layout, list(novices))
        out = as_output(out_dir, overwrite, [ckpt.dir])
        chosen = NovicePlan(novices, *mean_outputs(stats, novices, int(layout.config["hidden_size"])))
        per_shard = novice_tensors(ckpt, layout, chosen)
        config = copy.deepcopy(ckpt.config)
        sub_config(config, layout.spec)[CONFIG_KEY] = {str(layer): ids for layer, ids in novices.items()}
        counts = {layer: layout.num_experts - len(novices.get(layer, [])) for layer in layout.layers}
        record = {
            **layout_record(layout, counts),
            "novices": {str(layer): ids for layer, ids in novices.items()},
            "novices_unrouted": {str(layer): ids for layer, ids in chosen.unrouted.items() if ids},
            "novice_stats": {"path": str(Path(stats.path).resolve()) if stats.path else None, "sha256": stats.sha256},
            "memory": memory(ckpt, per_shard),
            "plan": plan.to_json(),
        }
        with out:
            hashes = out.write_shards(ckpt, per_shard, hash_shards=hash_shards, progress=progress)
            out.finish(ckpt, {**provenance.header(provenance.source(ckpt, hashes)), **record}, config)
    return out.out_dir
