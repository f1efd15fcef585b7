"""How much device memory a heal needs, worked out from the checkpoints' headers before any work.

With b the compute dtype's bytes (2 for bf16, 4 for float32), P_s and P_t the student's and the
teacher's parameter counts, T the trainable parameters (router rows and experts of the pruned
layers; every parameter with --train all or --recipe moe-pruner), A the adapter parameters
(r (out + in) per expert matrix) and X the largest pruned layer's expert weights:

    full:  4 P_s + 12 T + c T + b' T + b P_t + activations
                                                     (float32 master weights; grads and 2 AdamW states on T;
                                                      the best state's copy, c = 2 when every trained tensor
                                                      is stored as BF16, else 4; b' = b when b < 4: the
                                                      autocast copies of the trained weights)
    lora:  b P_s + 20 (A + R) + b X + b P_t + activations
                                                     (frozen student; adapters and router rows R with
                                                      grads, 2 AdamW states and the best state's copy;
                                                      one layer's adapted experts)
    activations ~ n (L (16 H + 3 k I) b + 16 V)      (n tokens per step; saved per layer; four float32 logits)
    local stage: 2 b W + 16 B + 4 N H b              (a teacher and a student layer W, the trained block B,
                                                      the cached block inputs and outputs of N tokens)

A run sharded over G ranks (torchrun) divides the model, gradient and optimizer terms by G, and
each rank's activations are those of its share (1/G) of the batch. The
estimate is compared with `--memory-budget` or the device's free memory (the host's available
memory on a CPU; 5% of it left to the allocator's fragmentation) and the run is refused up front, with
the figure, when it does not fit. Measured on one H200 (7.5B model, 25% removed, full-parameter, 1M
tokens): the run died at 137.7 GiB allocated where this estimate gives 136.1 GiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from surgery.io import Checkpoint
from surgery.refine.heal.pairing import HealError, Pairing
from surgery.refine.heal.synthetic import SAMPLES_PER_SEQUENCE

GIB = 2**30


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts that the memory formula needs, read from the headers."""

    student: int  # P_s
    teacher: int  # P_t
    trainable: int  # T with --train experts
    router: int  # R
    adapters_per_rank: int  # A / r
    largest_layer: int  # X
    largest_block: int  # B
    largest_expert: int  # one expert's weights, for the expert-by-expert local fit
    layer: int  # W: the largest decoder layer of the teacher
    hidden: int
    layers: int
    vocab: int
    routed_width: int  # k I


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _adapter_size(shape: tuple[int, ...]) -> int:
    """r = 1 adapter parameters of one expert matrix: [E, out, in] fused or [out, in] per expert."""
    return (shape[0] * (shape[1] + shape[2])) if len(shape) == 3 else sum(shape[-2:])


def model_sizes(pairing: Pairing) -> ModelSizes:
    s, layout = pairing.student, pairing.student_layout
    trainable = router = adapters = largest = block = expert = 0
    for layer in pairing.touched_layers:
        entry = layout.layers[layer]
        experts = [*entry.fused, *(n for names in entry.per_expert.values() for n in names)]
        sizes = [_numel(s.info(n).shape) for n in experts]
        routers = sum(_numel(s.info(n).shape) for n in entry.router)
        trainable += sum(sizes) + routers
        router += routers
        adapters += sum(_adapter_size(tuple(s.info(n).shape)) for n in experts)
        largest = max(largest, sum(sizes))
        block = max(block, sum(sizes) + routers)
        expert = max(expert, sum(sizes) // max(len(pairing.expert_map.get(layer, [])), 1))
    t = pairing.teacher
    per_layer: dict[str, int] = {}
    for name in t.names():
        if ".layers." in name:
            key = name.split(".layers.")[0] + "." + name.split(".layers.")[1].split(".")[0]
            per_layer[key] = per_layer.get(key, 0) + _numel(t.info(name).shape)
    config = layout.config
    routed = int(config.get("num_experts_per_tok") or layout.top_k or 1) * int(
        config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
    return ModelSizes(_count(s), _count(t), trainable, router, adapters, largest, block, expert,
                      max(per_layer.values(), default=0), int(config.get("hidden_size") or 0),
                      int(config.get("num_hidden_layers") or layout.num_hidden_layers),
                      int(config.get("vocab_size") or pairing.teacher.config.get("vocab_size") or 0), routed)


def _count(ckpt: Checkpoint) -> int:
    return sum(_numel(ckpt.info(n).shape) for n in ckpt.names())


def needed_bytes(sizes: ModelSizes, *, dtype_bytes: int, lora: int, train_all: bool, batch_tokens: int,
                 local_tokens: int, local: bool, distill: bool, world: int = 1, local_fit: str = "joint",
                 snapshot_bytes: int = 4) -> dict[str, int]:
    """The formula of the module docstring, term by term (bytes); "total" is the larger stage's sum."""
    b = dtype_bytes
    act = batch_tokens * (sizes.layers * (16 * sizes.hidden + 3 * sizes.routed_width) * b + 16 * sizes.vocab)
    if lora:
        trained = 20 * (lora * sizes.adapters_per_rank + sizes.router)
        weights = b * sizes.student + b * sizes.largest_layer + b * sizes.teacher
    else:
        t = sizes.student if train_all else sizes.trainable
        trained = (12 + snapshot_bytes) * t
        weights = 4 * sizes.student + b * sizes.teacher
    # float32 masters under bf16 autocast: each expert slice is cast anew and the copy kept for the backward
    casts = 0 if lora or b >= 4 else b * (sizes.student if train_all else sizes.trainable)
    kd = {"weights": weights // world, "optimizer": trained // world, "casts": casts // world,
          "activations": act // world}
    if local_fit == "experts":  # the block in its dtype, one expert and the router rows trained at a time
        block = b * sizes.largest_block + 16 * max(sizes.largest_expert, sizes.router)
    else:
        block = 16 * (lora * sizes.adapters_per_rank + sizes.router if lora else sizes.largest_block)
    local_terms = {"layers": 2 * b * sizes.layer, "block": block, "cache": 4 * local_tokens * sizes.hidden * b}
    totals = [sum(kd.values())] if distill else []
    totals += [sum(local_terms.values())] if local else []
    return {**kd, **{f"local_{k}": v for k, v in local_terms.items()}, "total": max(totals, default=0)}


def snapshot_dtype(pairing: Pairing, train_all: bool) -> torch.dtype:
    """The dtype of distillation's best-state copy: bfloat16 when every trained tensor is stored as BF16
    (the write rounds to it anyway, so the copy loses nothing), else float32."""
    s, layout = pairing.student, pairing.student_layout
    if train_all:
        names = list(s.names())
    else:
        names = [n for layer in pairing.touched_layers for entry in [layout.layers[layer]]
                 for n in (*entry.fused, *(m for ms in entry.per_expert.values() for m in ms), *entry.router)]
    return torch.bfloat16 if names and all(s.info(n).dtype == "BF16" for n in names) else torch.float32


def available_bytes(device: torch.device) -> int | None:
    """The device's free memory (the host's available memory for a CPU); None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _local_tokens(options) -> int:
    """Tokens the layer-local stage caches: --local-tokens, or fewer when --tokens reads less text (up to
    1 + SAMPLES_PER_SEQUENCE times it with teacher samples; all of DATA, unknown here, counts as --local-tokens)."""
    if not options.tokens:
        return options.local_tokens
    return min(options.local_tokens, options.tokens * (1 + SAMPLES_PER_SEQUENCE if options.synthesize else 1))


def check_memory(pairing: Pairing, device: torch.device, dtype: torch.dtype, options) -> str:
    """The layer-local fit to use ("joint", or "experts" when only the expert-by-expert fit fits, with
    options.local_fit "auto"); refuses (HealError, exit 2) when the run's estimate exceeds the budget."""
    steps = options.kd_steps if options.kd_steps is not None else options.kd_tokens
    sizes = model_sizes(pairing)
    train_all = options.train == "all" or options.recipe == "moe-pruner"
    common = dict(dtype_bytes=torch.empty((), dtype=dtype).element_size(), lora=options.lora, train_all=train_all,
                  snapshot_bytes=torch.empty((), dtype=snapshot_dtype(pairing, train_all)).element_size(),
                  batch_tokens=options.batch_size * options.seq_len, local_tokens=_local_tokens(options),
                  local=options.local_steps > 0 and options.recipe == "default", distill=steps > 0,
                  world=int(os.environ.get("WORLD_SIZE", "1")))
    free = available_bytes(device)
    budget = options.memory_budget * GIB if options.memory_budget is not None else free and int(0.95 * free)
    fits = ["joint", "experts"] if options.local_fit == "auto" else [options.local_fit]
    for fit in fits:
        need = needed_bytes(sizes, local_fit=fit, **common)
        if budget is None or need["total"] <= budget:
            return fit
    mode = f"--lora {options.lora}" if options.lora else "full-parameter"
    where = "--memory-budget" if options.memory_budget is not None else f"free on {device}"
    stage, terms = _largest_stage(need, common["distill"])
    parts = ", ".join(f"{k.removeprefix('local_')} {need[k] / GIB:.2f}" for k in terms if need[k])
    advice = "a smaller --lora rank" if options.lora else "--lora"
    raise HealError(f"{pairing.student.dir}: heal ({mode}) needs about {need['total'] / GIB:.2f} GiB in its {stage} "
                    f"({parts} GiB), more than the {budget / GIB:.3g} GiB {where}; try {advice}, a smaller "
                    "--batch-size or --local-tokens, or torchrun over more devices")


def _largest_stage(need: dict[str, int], distill: bool) -> tuple[str, list[str]]:
    """The stage whose terms make `need["total"]`, and those terms (a refusal lists only the stage that runs
    out, not a stage that is off)."""
    kd = ["weights", "optimizer", "casts", "activations"]
    if distill and sum(need[k] for k in kd) == need["total"]:
        return "distillation", kd
    return "layer-local stage", [k for k in need if k.startswith("local_")]
