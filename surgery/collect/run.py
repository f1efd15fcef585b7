"""One calibration pass → one statistics file, on one device or many (torch.distributed)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stats_formats import StatsWriter

from surgery.architectures import resolve
from surgery.architectures.layout import active_groups
from surgery.model.data import build_sequences, cap_seq_len
from surgery.errors import UserError
from surgery.io.identity import config_sha256, router_sha256
from surgery.io import Checkpoint
from surgery.io.quantization import check_quantized
from surgery.model.load import load_model
from surgery.collect.options import CollectOptions, default_holdout
from surgery.collect.accumulator import LayerAccumulator, all_reduce_field
from surgery.collect.gradients import GradientSums, gradient_pass, stream_gradients
from surgery.collect.hooks import Instrument, instrument_for
from surgery.collect.progressive import RouterMask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CollectSummary:
    """`seconds` is the compute time: from the moment the model (or, streamed, its frame) is loaded to the
    last batch; `load_seconds` the loading before it. `tokens_per_second` counts every token that went
    through the model, held-out ones included (this rank's share under torchrun)."""

    tokens: int
    holdout_tokens: int
    seconds: float
    dead_experts: dict[int, int] = field(default_factory=dict)
    rank: int = 0
    load_seconds: float = 0.0
    mode: str = "in memory"

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens + self.holdout_tokens) / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        dead = ", ".join(f"{layer}:{n}" for layer, n in self.dead_experts.items() if n) or "none"
        load = "the frame (layers streamed)" if self.mode == "streamed" else "the model"
        return [
            f"Loaded {load} in {self.load_seconds:.1f} s.",
            f"Collected {self.tokens} tokens (+{self.holdout_tokens} held out) in {self.seconds:.1f} s "
            f"({self.tokens_per_second:.0f} tokens/s over all {self.tokens + self.holdout_tokens} tokens, {self.mode}).",
            f"Dead experts (never routed) per layer: {dead}.",
        ]


def check_output(output: str | os.PathLike) -> None:
    """Refuse, before any work, a statistics path that cannot be written: its folder must exist, be a
    folder and take new files (a probe file is created and removed), and the path must not be a folder."""
    import tempfile

    out = Path(output)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; the statistics file is one file")
    parent = out.parent
    if not parent.exists():
        raise UserError(f"{out}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-surgery-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: cannot write in {parent} ({e.strerror or e})") from None


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


def _reduce(accs: dict[int, LayerAccumulator]) -> None:
    if torch.distributed.is_initialized():
        for layer in sorted(accs):
            for name, t in accs[layer].sums.items():
                all_reduce_field(name, t)


@dataclass(frozen=True)
class _Setup:
    """What the checkpoint and the process group say before any text is read."""

    model_dir: str
    layout: Any
    identity: dict
    config_path: Path
    masked: dict[int, list[int]]
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    owned: bool  # this call set up the process group, so it tears it down
    quantization: dict | None = None  # the source's scheme (surgery.io.quantization), None when unquantized


@dataclass(frozen=True)
class _Calibration:
    """The packed calibration sequences, this rank's share of them in batches."""

    batches: list[torch.Tensor]
    held_batches: list[torch.Tensor]
    num_main: int
    num_held: int
    seq_len: int
    config: Any
    vocab: int


@dataclass(frozen=True)
class _Sums:
    main: dict[int, LayerAccumulator]
    held: dict[int, LayerAccumulator]
    gradients: dict[int, GradientSums]
    seconds: float  # compute, after loading
    load_seconds: float
    mode: str  # "in memory" or "streamed"
    prefetch: bool


def collect(model_dir: str | Path, data: list[str], output: str | Path, options: CollectOptions | None = None,
            **changes: Any) -> CollectSummary:
    """Run the calibration text through the model once and write the schema-v1 statistics file.

    `options` (default CollectOptions()) says how; keyword `changes` replace single fields of it,
    e.g. `collect(model, data, out, samples=8, device="cpu")`.
    """
    options = replace(options or CollectOptions(), **changes)
    if options.holdout is None:
        options = replace(options, holdout=default_holdout(options.samples))
    check_output(output)
    setup = _setup(str(model_dir), options)
    calib = _calibration(setup, data, options)
    sums = _run(setup, calib, options, Path(output))
    for accs in (sums.main, sums.held):  # gradient sums are combined as they finish (GradientSums.finish)
        _reduce(accs)
    summary = _write(setup, calib, sums, data, options, output)
    _finish_dist(setup.owned)
    return summary


def _setup(model_dir: str, options: CollectOptions) -> _Setup:
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    if layout.spec.config_path:
        raise UserError(f"{ckpt.config_path}: collect runs text-only checkpoints; {layout.spec.model_type} nests its "
                        "language model in a multimodal wrapper (the rewriter supports it, the collector does not)")
    identity = {"config_sha256": config_sha256(ckpt.config), "router_sha256": router_sha256(ckpt, layout)}
    try:
        scheme = check_quantized(ckpt)  # unsupported schemes, missing or mis-shaped scales: before any text is read
    finally:
        ckpt.close()
    quantization = None if scheme is None else {"method": scheme.method, "scheme": scheme.name}
    masked = _progressive_layers(layout, options.progressive)
    dev = pick_device(options.device)
    dt = pick_dtype(options.dtype, dev)
    import torch.distributed as dist

    owned = not dist.is_initialized()  # a group the caller set up is the caller's to tear down
    rank, world = _dist()
    return _Setup(model_dir, layout, identity, ckpt.config_path, masked, dev, dt, rank, world, owned, quantization)


def _calibration(setup: _Setup, data: list[str], options: CollectOptions) -> _Calibration:
    """Tokenize and pack the text; main sequences first, then the held-out ones; refuse a foreign tokenizer."""
    from transformers import AutoConfig

    from surgery.model.load import load_tokenizer

    samples, holdout = options.samples, options.holdout
    tokenizer = load_tokenizer(setup.model_dir)
    seq_len = cap_seq_len(setup.layout.config, options.seq_len)
    ids = build_sequences(list(data), tokenizer, samples + holdout, seq_len, options.seed, options.sampling).input_ids
    n_main = min(samples, ids.shape[0])
    if holdout and ids.shape[0] < samples + holdout:
        # Text ran out: keep a share aside anyway so that `auto` still has held-out data.
        n_main = ids.shape[0] - min(holdout, max(1, ids.shape[0] // 8))
    main_ids, held_ids = ids[:n_main], ids[n_main:]
    mine = lambda t: t[setup.rank::setup.world]  # noqa: E731 - each rank takes a disjoint share
    batches = [b for b in mine(main_ids).split(options.batch_size)] if n_main else []
    held_batches = [b for b in mine(held_ids).split(options.batch_size)] if held_ids.shape[0] else []

    config = AutoConfig.from_pretrained(setup.model_dir)
    vocab = int(config.get_text_config().vocab_size)  # token_bits: which token ids each expert saw
    if ids.numel() and int(ids.max()) >= vocab:
        raise UserError(f"{setup.config_path}: the tokenizer in {setup.model_dir} gives token id {int(ids.max())}, "
                        f"but vocab_size is {vocab}: the tokenizer does not belong to this model")
    return _Calibration(batches, held_batches, int(n_main), int(held_ids.shape[0]), int(seq_len), config, vocab)


def _run(setup: _Setup, calib: _Calibration, options: CollectOptions, output: Path) -> _Sums:
    tol = 1e-4 if setup.dtype == torch.float32 else 3e-2
    streamed = _stream(setup, options)
    run = _run_streamed if streamed else _run_loaded
    clock: dict[str, float] = {"start": time.perf_counter()}
    main, held, grads = run(setup, calib, options, tol, output.resolve().parent, clock)
    end = time.perf_counter()
    loaded = clock.get("loaded", clock["start"])
    return _Sums(main, held, grads, end - loaded, loaded - clock["start"], "streamed" if streamed else "in memory",
                 bool(streamed and options.prefetch))


def _stream(setup: _Setup, options: CollectOptions) -> bool:
    """--stream-layers as given; auto (None): stream when the weights do not fit in the device's free memory."""
    if options.stream_layers is not None:
        return bool(options.stream_layers)
    from surgery.model.load import fits, model_bytes

    return not fits(model_bytes(setup.model_dir, setup.dtype), setup.device)


def _run_streamed(setup: _Setup, calib: _Calibration, options: CollectOptions, tol: float, spill_dir: Path,
                  clock: dict[str, float]):
    """One decoder layer in memory at a time (surgery.model.streaming); the clock's "loaded" is when the
    first pass's frame (embeddings, norms) is in place: layer weights are read during the compute."""
    from surgery.model.streaming import stream_forward

    progress = options.progress and setup.rank == 0
    layout, dev = setup.layout, setup.device
    holder: dict = {}
    for flag, bs in ((False, calib.batches), (True, calib.held_batches)):
        if bs:
            stream_forward(setup.model_dir, calib.config, layout, bs, dev, setup.dtype, progress=progress,
                           hidden_states=options.hidden_states, spill_dir=spill_dir,
                           on_model=lambda m, f=flag: holder.setdefault(f, _instrument(
                               m, layout.spec, dev, tol, f, setup.masked, calib.vocab, options)),
                           before_batch=lambda j, f=flag, bs=bs: holder[f].set_tokens(bs[j]),
                           prefetch=options.prefetch, on_loaded=lambda: clock.setdefault("loaded", time.perf_counter()))
    main_accs = holder[False].main if False in holder else {}
    held_accs = holder[True].held if True in holder else {}
    grad_sums: dict[int, GradientSums] = {}
    if options.gradients:
        grad_sums = stream_gradients(setup.model_dir, calib.config, layout, calib.batches, dev, setup.dtype,
                                     setup.masked, hidden_states=options.hidden_states, spill_dir=spill_dir,
                                     progress=progress, form=options.gradients)
    return main_accs, held_accs, grad_sums


def _run_loaded(setup: _Setup, calib: _Calibration, options: CollectOptions, tol: float, spill_dir: Path,
                clock: dict[str, float]):
    """The whole model loaded straight onto the device (novice checkpoints get their constant experts),
    instrumented by hooks."""
    dev, spec = setup.device, setup.layout.spec
    model = load_model(setup.model_dir, dev, setup.dtype)
    clock["loaded"] = time.perf_counter()
    inst = instrument_for(model, spec, dev, tol, calib.vocab, options)
    mask = RouterMask(model, spec, setup.masked)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    batches, held_batches = calib.batches, calib.held_batches
    total = sum(b.numel() for b in batches) + sum(b.numel() for b in held_batches)
    progress = options.progress and setup.rank == 0
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="Collecting", disable=not progress)
    grad_sums: dict[int, GradientSums] = {}
    try:
        with torch.no_grad():
            for flag, bs in ((False, batches), (True, held_batches)):
                inst.holdout = flag
                for b in bs:
                    inst.set_tokens(b)
                    base(input_ids=b.to(dev), use_cache=False)
                    bar.update(b.numel())
        inst.restore()  # the gradient pass runs the model's own experts
        if options.gradients:
            grad_sums = gradient_pass(model, spec, batches, dev, progress, options.gradients)
    finally:
        bar.close()
        mask.restore()
        inst.restore()
    return inst.main, inst.held, grad_sums


def _write(setup: _Setup, calib: _Calibration, sums: _Sums, data: list[str], options: CollectOptions,
           output: str | Path) -> CollectSummary:
    """The statistics file (rank 0 only) and the summary every rank returns."""
    layout, main_accs, held_accs = setup.layout, sums.main, sums.held
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
        "vocab_size": calib.vocab,
        **setup.identity,
    }
    if not main_accs:
        raise ValueError("no calibration sequences reached the model")
    n_tokens = int(main_accs[min(main_accs)].sums["tokens"].item())
    n_held = int(held_accs[min(held_accs)].sums["tokens"].item()) if held_accs else 0
    calibration = {
        "sources": [str(p) for p in data],
        "num_sequences": calib.num_main,
        "num_tokens": n_tokens,
        "seq_len": calib.seq_len,
        "seed": int(options.seed),
        "holdout_sequences": calib.num_held if held_accs else 0,
        "sampling": options.sampling,
        **({"gradients": options.gradients} if options.gradients else {}),
    }
    processed = n_tokens + n_held
    calibration["timing"] = {  # this rank's run; optional, readers that do not know it ignore it
        "load_seconds": round(sums.load_seconds, 6),
        "compute_seconds": round(sums.seconds, 6),
        "tokens_processed": processed,
        "tokens_per_second": round(processed / sums.seconds, 1) if sums.seconds else 0.0,
        "mode": sums.mode,
        "prefetch": sums.prefetch,
        "device": str(setup.device),
        "dtype": str(setup.dtype).removeprefix("torch."),
    }
    if setup.quantization:  # the weights were read dequantized from this scheme
        calibration["quantization"] = setup.quantization
    if setup.masked:
        calibration["progressive_plan"] = {str(layer): ids for layer, ids in sorted(setup.masked.items())}
    summary = CollectSummary(n_tokens, n_held, sums.seconds, rank=setup.rank, load_seconds=sums.load_seconds,
                             mode=sums.mode)
    for layer, acc in main_accs.items():
        summary.dead_experts[layer] = int((acc.sums["count"] == 0).sum().item())
    if setup.rank == 0:
        writer = StatsWriter(model_meta, calibration)
        for accs in (main_accs, sums.gradients):
            for layer, acc in sorted(accs.items()):
                for name, t in acc.sums.items():
                    writer.add(layer, name, t.cpu().numpy())
        for layer, acc in sorted(held_accs.items()):
            for name, t in acc.sums.items():
                writer.add(layer, name, t.cpu().numpy(), holdout=True)
        writer.save(output)
    return summary


def _instrument(model, spec, dev, tol, holdout_flag: bool, masked: dict[int, list[int]], vocab: int,
                options: CollectOptions) -> Instrument:
    inst = instrument_for(model, spec, dev, tol, vocab, options)
    inst.holdout = holdout_flag
    RouterMask(model, spec, masked)  # the streamed model is discarded afterwards: nothing to restore
    return inst


def _progressive_layers(layout, keep: dict[int, list[int]] | None) -> dict[int, list[int]]:
    """The plan (validated by the caller) restricted to layers transformers runs (MTP layers are never built)."""
    return {layer: ids for layer, ids in (keep or {}).items() if layer < layout.num_hidden_layers}


def _dims(accs: dict[int, LayerAccumulator]) -> tuple[int, int]:
    acc = next(iter(accs.values()))
    return acc.H, acc.I
