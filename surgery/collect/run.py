"""One calibration pass → one statistics file, on one device or many (torch.distributed)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from stats_formats import StatsWriter

from surgery.architectures import resolve
from surgery.architectures.layout import active_groups
from surgery.model.data import build_sequences, cap_seq_len
from surgery.errors import UserError
from surgery.io.identity import config_sha256, router_sha256
from surgery.io import Checkpoint
from surgery.model.load import load_model
from surgery.model.novices import is_novice_checkpoint
from surgery.collect.accumulator import LayerAccumulator, all_reduce_field
from surgery.collect.gradients import GradientSums, gradient_pass, stream_gradients
from surgery.collect.hooks import Instrument
from surgery.collect.progressive import RouterMask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CollectSummary:
    tokens: int
    holdout_tokens: int
    seconds: float
    dead_experts: dict[int, int] = field(default_factory=dict)
    rank: int = 0

    def lines(self) -> list[str]:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        dead = ", ".join(f"{layer}:{n}" for layer, n in self.dead_experts.items() if n) or "none"
        return [
            f"Collected {self.tokens} tokens (+{self.holdout_tokens} held out) in {self.seconds:.1f} s ({rate:.0f} tokens/s).",
            f"Dead experts (never routed) per layer: {dead}.",
        ]


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _finish_dist(owned: bool) -> None:
    """Wait for rank 0's write, then tear the group down: a rank that exits with gloo's threads
    still alive aborts ("terminate called without an active exception") and fails the launch."""
    import torch.distributed as dist

    if owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _reduce(accs: dict[int, LayerAccumulator] | dict[int, GradientSums]) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    for layer in sorted(accs):
        for name, t in accs[layer].sums.items():
            all_reduce_field(name, t)


def collect(
    model_dir: str | Path,
    data: list[str],
    output: str | Path,
    *,
    samples: int = 256,
    seq_len: int = 2048,
    seed: int = 0,
    batch_size: int = 4,
    holdout: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    stream_layers: bool = False,
    hidden_states: str = "auto",
    progress: bool = True,
    progressive: dict[int, list[int]] | None = None,
    gradients: bool = False,
    histogram: bool = False,
) -> CollectSummary:
    """Run the calibration text through the model once and write the schema-v1 statistics file.

    `progressive` ({layer: kept expert ids}): those layers behave as pruned while collecting
    (see surgery.collect.progressive); their dropped experts get zero statistics.
    `gradients`: also back-propagate each main sequence's loss and write the gradient fields
    (see surgery.collect.gradients). `histogram`: also write `out_hist` (for mcs-eao).
    """
    from transformers import AutoConfig

    from surgery.model.load import load_tokenizer

    model_dir = str(model_dir)
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    if layout.spec.config_path:
        raise UserError(f"{ckpt.config_path}: collect runs text-only checkpoints; {layout.spec.model_type} nests its "
                        "language model in a multimodal wrapper (the rewriter supports it, the collector does not)")
    identity = {"config_sha256": config_sha256(ckpt.config), "router_sha256": router_sha256(ckpt, layout)}
    ckpt.close()
    masked = _progressive_layers(layout, progressive)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    import torch.distributed as dist

    owned = not dist.is_initialized()  # a group the caller set up is the caller's to tear down
    rank, world = _dist()

    tokenizer = load_tokenizer(model_dir)
    seq_len = cap_seq_len(layout.config, seq_len)
    calib = build_sequences(list(data), tokenizer, samples + holdout, seq_len, seed)
    ids = calib.input_ids
    n_main = min(samples, ids.shape[0])
    if holdout and ids.shape[0] < samples + holdout:
        # Text ran out: keep a share aside anyway so that `auto` still has held-out data.
        n_main = ids.shape[0] - min(holdout, max(1, ids.shape[0] // 8))
    main_ids, held_ids = ids[:n_main], ids[n_main:]
    mine = lambda t: t[rank::world]  # noqa: E731 - each rank takes a disjoint share
    batches = [b for b in mine(main_ids).split(batch_size)] if n_main else []
    held_batches = [b for b in mine(held_ids).split(batch_size)] if held_ids.shape[0] else []

    config = AutoConfig.from_pretrained(model_dir)
    vocab = int(config.get_text_config().vocab_size)  # token_bits: which token ids each expert saw
    if ids.numel() and int(ids.max()) >= vocab:
        raise UserError(f"{ckpt.config_path}: the tokenizer in {model_dir} gives token id {int(ids.max())}, but "
                        f"vocab_size is {vocab}: the tokenizer does not belong to this model")
    tol = 1e-4 if dt == torch.float32 else 3e-2
    grad_sums: dict[int, GradientSums] = {}
    start = time.perf_counter()
    if stream_layers:
        from surgery.model.streaming import stream_forward

        if is_novice_checkpoint(model_dir):
            raise UserError(f"{model_dir}: --stream-layers cannot load MoNE novice checkpoints; collect without it")

        holder: dict = {}
        for flag, bs in ((False, batches), (True, held_batches)):
            if bs:
                stream_forward(model_dir, config, layout, bs, dev, dt, progress=progress and rank == 0,
                               hidden_states=hidden_states, spill_dir=Path(output).resolve().parent,
                               on_model=lambda m, f=flag: holder.setdefault(f, _instrument(m, layout.spec, dev, tol, f,
                                                                                            masked, vocab, histogram)),
                               before_batch=lambda j, f=flag, bs=bs: holder[f].set_tokens(bs[j]))
        main_accs = holder[False].main if False in holder else {}
        held_accs = holder[True].held if True in holder else {}
        if gradients:
            grad_sums = stream_gradients(model_dir, config, layout, batches, dev, dt, masked, hidden_states=hidden_states,
                                         spill_dir=Path(output).resolve().parent, progress=progress and rank == 0)
    else:
        model = load_model(model_dir, dev, dt)  # novice checkpoints get their constant experts
        inst = Instrument(model, layout.spec, dev, tol, vocab_size=vocab, histogram=histogram)
        mask = RouterMask(model, layout.spec, masked)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        total = sum(b.numel() for b in batches) + sum(b.numel() for b in held_batches)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="Collecting", disable=not progress or rank != 0)
        try:
            with torch.no_grad():
                for flag, bs in ((False, batches), (True, held_batches)):
                    inst.holdout = flag
                    for b in bs:
                        inst.set_tokens(b)
                        base(input_ids=b.to(dev), use_cache=False)
                        bar.update(b.numel())
            inst.restore()  # the gradient pass runs the model's own experts
            if gradients:
                grad_sums = gradient_pass(model, layout.spec, batches, dev, progress and rank == 0)
        finally:
            bar.close()
            mask.restore()
            inst.restore()
        main_accs, held_accs = inst.main, inst.held
    seconds = time.perf_counter() - start
    _reduce(main_accs)
    _reduce(held_accs)
    _reduce(grad_sums)

    hidden, inter = _dims(main_accs)
    model_meta = {
        "model_type": layout.spec.model_type,
        "num_hidden_layers": layout.num_hidden_layers,
        "num_experts": layout.num_experts,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "top_k": layout.top_k,
        "moe_layers": sorted(main_accs),
        "n_group": active_groups(layout),
        "min_group_size": layout.spec.min_group_size,
        "vocab_size": vocab,
        **identity,
    }
    if not main_accs:
        raise ValueError("no calibration sequences reached the model")
    n_tokens = int(main_accs[min(main_accs)].sums["tokens"].item())
    n_held = int(held_accs[min(held_accs)].sums["tokens"].item()) if held_accs else 0
    calibration = {
        "sources": [str(p) for p in data],
        "num_sequences": int(n_main),
        "num_tokens": n_tokens,
        "seq_len": int(seq_len),
        "seed": int(seed),
        "holdout_sequences": int(held_ids.shape[0]) if held_accs else 0,
    }
    if masked:
        calibration["progressive_plan"] = {str(layer): ids for layer, ids in sorted(masked.items())}
    summary = CollectSummary(n_tokens, n_held, seconds, rank=rank)
    for layer, acc in main_accs.items():
        summary.dead_experts[layer] = int((acc.sums["count"] == 0).sum().item())
    if rank == 0:
        writer = StatsWriter(model_meta, calibration)
        for accs in (main_accs, grad_sums):
            for layer, acc in sorted(accs.items()):
                for name, t in acc.sums.items():
                    writer.add(layer, name, t.cpu().numpy())
        for layer, acc in sorted(held_accs.items()):
            for name, t in acc.sums.items():
                writer.add(layer, name, t.cpu().numpy(), holdout=True)
        writer.save(output)
    _finish_dist(owned)
    return summary


def _instrument(model, spec, dev, tol, holdout_flag: bool, masked: dict[int, list[int]], vocab: int,
                histogram: bool) -> Instrument:
    inst = Instrument(model, spec, dev, tol, vocab_size=vocab, histogram=histogram)
    inst.holdout = holdout_flag
    RouterMask(model, spec, masked)  # the streamed model is discarded afterwards: nothing to restore
    return inst


def _progressive_layers(layout, keep: dict[int, list[int]] | None) -> dict[int, list[int]]:
    """The plan (validated by the caller) restricted to layers transformers runs (MTP layers are never built)."""
    return {layer: ids for layer, ids in (keep or {}).items() if layer < layout.num_hidden_layers}


def _dims(accs: dict[int, LayerAccumulator]) -> tuple[int, int]:
    acc = next(iter(accs.values()))
    return acc.H, acc.I
