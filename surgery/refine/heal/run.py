"""`heal`: layer-local fit, then logits distillation, then the student's own layout written back.

The output has the student's tensor names, dtypes and shards: trained tensors are re-encoded in
their on-disk dtype (quantized students: in their own scheme, or unquantized with --output-dtype bf16),
every other tensor is copied byte for byte; pruning.json gains a `heal` record.

Host memory does not grow with the model: each layer's trained tensors go to a spill folder inside the
output's temporary folder as soon as the layer is done (surgery.refine.heal.spill), the distillation
stage reads them back one layer at a time, and the write streams them one tensor at a time.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.collect.run import pick_device, pick_dtype
from surgery.io.derived import DerivedCheckpoint
from surgery.io.identity import file_sha256
from surgery.io.provenance import now
from surgery.model.data import build_sequences, cap_seq_len
from surgery.refine.heal.distributed import World, barrier, broadcast, check_sharded, rank_device, shard, split, total
from surgery.refine.heal.distributed import start as join_ranks
from surgery.refine.heal.export import OUTPUT_DTYPES
from surgery.refine.heal.lora import check_lora, lora_fit, lora_student
from surgery.refine.heal.memory import check_memory, snapshot_dtype
from surgery.refine.heal.synthetic import SAMPLES_PER_SEQUENCE, teacher_samples
from surgery.refine.heal.recipes import RECIPE_LR, RECIPES, MoEPrunerObjective
from surgery.refine.heal.pairing import HealError, Pairing, pair
from surgery.refine.heal.spill import SPILL_DIR, Spill
from surgery.refine.heal.write import LayerWriter, write_output

HELD_OUT_SHARE = 16  # one sequence in 16 is kept aside to measure each stage
DEFAULT_TOKENS = 8 * 2**20  # read at most this much text when --tokens is not given, and distil on this many
TRAIN_CHOICES = ("experts", "all")
LOCAL_FITS = ("auto", "joint", "experts")


@dataclass(frozen=True)
class HealOptions:
    """How to heal. tokens None = all the text, up to DEFAULT_TOKENS; tokens_at_most: `tokens` is a cap (shorter
    text is used whole, as `prune`'s refit wants) rather than a demand that fails on short text. local_steps 0
    turns the layer-local stage off; kd_steps None = as many distillation steps as distil on `kd_tokens` tokens
    (cycling through the training sequences when the text is shorter), 0 turns the stage off. synthesize: when
    the text gives the local stage fewer than `local_tokens` tokens, the teacher's sampled continuations of
    prefixes of the text make up the difference, up to SAMPLES_PER_SEQUENCE per real sequence (surgery.refine.heal.synthetic).
    local_inputs: "student", "teacher" or "both" (surgery.refine.heal.local). train: "experts" or "all".
    lora: adapter rank on the pruned layers' experts, 0 = train the weights themselves (surgery.refine.heal.lora).
    recipe: "default" or "moe-pruner" (surgery.refine.heal.recipes); lr None = the recipe's.
    memory_budget: GiB the run may use on its device (None = the device's free memory; surgery.refine.heal.memory).
    local_fit: "joint", "experts" (surgery.refine.heal.expertwise) or "auto" (experts when the joint fit does not fit)."""

    tokens: int | None = None
    tokens_at_most: bool = False
    output_dtype: str | None = None  # None: the student's own dtypes and scheme; "bf16": quantized weights unquantized
    local_steps: int = 200
    local_tokens: int = 2**18
    local_lr: float = 3e-4
    local_inputs: str = "student"
    synthesize: bool = True
    kd_steps: int | None = None
    kd_tokens: int = DEFAULT_TOKENS
    lr: float | None = None
    train: str = "experts"
    lora: int = 0
    recipe: str = "default"
    memory_budget: float | None = None
    local_fit: str = "auto"
    batch_size: int = 8
    seq_len: int = 1024
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


@dataclass
class _Run:
    """One heal in progress: the pair, where it runs, the token ids, what was trained and the record."""

    pairing: Pairing
    options: HealOptions
    device: torch.device
    dtype: torch.dtype  # the streamed layers and the teacher; trained weights are float32
    train_ids: torch.Tensor
    held_ids: torch.Tensor
    seq_len: int
    record: dict
    spill: Spill | None = None
    writer: LayerWriter | None = None  # rank 0 only
    world: World = field(default_factory=World)

    @property
    def kd_steps(self) -> int:
        o = self.options
        return o.kd_steps if o.kd_steps is not None else -(-o.kd_tokens // (o.batch_size * self.seq_len))


def heal(student_dir: str | Path, teacher_dir: str | Path, data: list[str], out_dir: str | Path,
         options: HealOptions = HealOptions()) -> dict:
    """Heal `student_dir` against `teacher_dir` into `out_dir`; returns the `heal` record written to pruning.json.

    The output folder is opened (and refused if it exists) before any training."""
    if options.train not in TRAIN_CHOICES:
        raise HealError(f"--train {options.train!r}: choose experts or all")
    if options.output_dtype not in (None, *OUTPUT_DTYPES):
        raise HealError(f"--output-dtype {options.output_dtype!r}: choose {' or '.join(OUTPUT_DTYPES)}")
    if options.local_fit not in LOCAL_FITS:
        raise HealError(f"--local-fit {options.local_fit!r}: choose {', '.join(LOCAL_FITS)}")
    if options.recipe not in RECIPES:
        raise HealError(f"--recipe {options.recipe!r}: choose {' or '.join(RECIPES)}")
    world = join_ranks(pick_device(options.device))  # torchrun: rank 0 writes (surgery.refine.heal.distributed)
    output = DerivedCheckpoint(out_dir, overwrite=options.overwrite, inputs=[student_dir, teacher_dir],
                               inputs_label="the student and the teacher") if world.rank == 0 else contextlib.nullcontext()
    with output as out, pair(student_dir, teacher_dir) as pairing:
        if not pairing.touched_layers:
            raise HealError(f"{pairing.record_path}: no MoE layer was pruned; nothing to heal")
        check_lora(pairing, options.lora, options.train)
        _check_novices(pairing, options)
        check_sharded(world, options, pairing.sparsified)
        run = _start(pairing, data, teacher_dir, options, world)
        if not _local_on(run) and run.kd_steps <= 0:
            raise HealError("both stages are off (--local-steps 0 and --kd-steps 0): nothing to do")
        run.record["local_fit"] = check_memory(pairing, run.device, run.dtype, options)
        with _spill_folder(out) as folder, Spill(folder) as run.spill:  # removed when heal ends, however it ends
            if world.rank == 0:
                run.writer = LayerWriter(pairing.student, pairing.student_layout, run.spill, options.output_dtype)
            start = time.perf_counter()
            if _local_on(run):
                _local(run)
            _distill(run)
            run.record["seconds"] = round(time.perf_counter() - start, 2)
            _timing(run, time.perf_counter() - start)
            if run.device.type == "cuda":
                run.record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**20)
            if world.rank == 0:
                write_output(run.writer, out, pairing, run.record)
    barrier(world)  # the others wait until rank 0's output is complete
    return run.record


def _local_on(run: _Run) -> bool:
    return run.options.local_steps > 0 and run.options.recipe == "default"


@contextlib.contextmanager
def _spill_folder(out: DerivedCheckpoint | None):
    """Rank 0 spills inside its output's temporary folder; the other ranks of a sharded run (no output)
    into a temporary folder of their own."""
    if out is not None:
        yield out.tmp / SPILL_DIR
        return
    with tempfile.TemporaryDirectory(prefix="moe-surgery-heal-") as tmp:
        yield Path(tmp) / SPILL_DIR


def _timing(run: _Run, seconds: float) -> None:
    """Whole-model loading (teacher sampling, distillation) apart from compute; tokens through the models:
    the local stage's (every layer of both models) and the distillation's (both models, every step)."""
    load = run.record.pop("_load_seconds", 0.0)
    tokens = 0
    for stage in run.record["stages"]:
        if stage["stage"] == "local":
            tokens += stage["tokens"] + run.record["held_out_tokens"]
        else:
            tokens += int(stage.get("tokens", 0))
    compute = max(seconds - load, 0.0)
    run.record["timing"] = {"load_seconds": round(load, 3), "compute_seconds": round(compute, 3),
                            "tokens_processed": tokens,
                            "tokens_per_second": round(tokens / compute, 1) if compute else 0.0}


def _loaded(run: _Run, model):
    """Adds a model's load time (recorded by load_model) to the run's."""
    run.record["_load_seconds"] = run.record.get("_load_seconds", 0.0) + getattr(model, "moe_surgery_load_seconds", 0.0)
    return model


def _start(pairing: Pairing, data: list[str], teacher_dir: str | Path, options: HealOptions, world: World) -> _Run:
    dev = rank_device(pick_device(options.device), world)
    dt = pick_dtype(options.dtype, dev)
    train_ids, held_ids, seq_len = _sequences(pairing, data, options.tokens, options.seq_len, options.seed,
                                         at_most=options.tokens_at_most)
    record: dict = {
        "created": now(),
        "teacher": str(Path(teacher_dir).resolve()),
        "data": [{"path": str(p), "sha256": file_sha256(p)} for p in data],
        "tokens": int(train_ids.numel() + held_ids.numel()),
        "held_out_tokens": int(held_ids.numel()),
        "seq_len": seq_len, "seed": options.seed, "device": str(dev), "stages": [],
        **({"ranks": world.size} if world.sharded else {}),
    }
    return _Run(pairing, options, dev, dt, train_ids, held_ids, seq_len, record, world=world)


def _sequences(pairing: Pairing, data: list[str], tokens: int | None, seq_len: int, seed: int, at_most: bool = False):
    """(training sequences, held-out sequences, seq_len). tokens None = all the text, up to DEFAULT_TOKENS;
    at_most: fewer than `tokens` is fine (at least two sequences)."""
    from surgery.model.load import load_tokenizer

    tokenizer = load_tokenizer(pairing.teacher.dir)
    seq_len = cap_seq_len(pairing.teacher.config, seq_len)
    wanted = -(-(tokens or DEFAULT_TOKENS) // seq_len)
    if wanted < 2:
        raise HealError(f"--tokens {tokens}: need at least two sequences of {seq_len} tokens (one is held out)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = build_sequences(list(data), tokenizer, wanted, seq_len, seed)
    need = wanted if tokens and not at_most else 2
    if calib.num_sequences < need:
        asked = (f"--tokens asks for {need * seq_len}" if tokens and not at_most
                 else f"{'the refit' if at_most else 'heal'} needs at least {need * seq_len}")
        raise HealError(f"{', '.join(map(str, data))}: only {calib.num_tokens} tokens of text, {asked} "
                        f"({need} sequences of {seq_len})")
    wanted = calib.num_sequences
    held = max(1, wanted // HELD_OUT_SHARE)
    return calib.input_ids[: wanted - held], calib.input_ids[wanted - held:], seq_len


def _local_ids(run: _Run) -> tuple[torch.Tensor, dict]:
    """The local stage's training sequences: real ones, topped up with teacher samples when short."""
    o = run.options
    n_local = max(1, min(len(run.train_ids), o.local_tokens // run.seq_len))
    local_ids = run.train_ids[:n_local]
    missing = min(o.local_tokens // run.seq_len, (1 + SAMPLES_PER_SEQUENCE) * n_local) - n_local
    if not o.synthesize or missing <= 0:
        return local_ids, {}
    from surgery.model.load import load_model

    t0 = time.perf_counter()
    teacher = _loaded(run, load_model(run.pairing.teacher.dir, str(run.device), run.dtype))
    extra = teacher_samples(teacher, local_ids, missing, o.seed, run.device, progress=o.progress)
    sampled = {"sequences": int(extra.shape[0]), "tokens": int(extra.numel()),
               "seconds": round(time.perf_counter() - t0, 2)}
    return torch.cat([local_ids, extra]), {"teacher_samples": sampled}


def _local(run: _Run) -> None:
    """Stage 1: fit each pruned block to the teacher's, layer by layer (surgery.refine.heal.local); under
    torchrun rank 0 fits and the others receive its values for the distillation."""
    from surgery.refine.heal.local import local_stage

    o = run.options
    if run.world.rank == 0:
        local_ids, sampled = _local_ids(run)
        batches = [*local_ids.split(o.batch_size), *run.held_ids.split(o.batch_size)]

        def hand_off(layer: int, params: dict[str, torch.Tensor]) -> None:
            """Distillation follows: park the exact float32 values; else the layer's tensors as written."""
            if run.kd_steps > 0:
                run.spill.put_values(str(layer), params)
            else:
                run.writer.put(str(layer), params)

        local = local_stage(run.pairing, batches, run.held_ids.numel(), steps=o.local_steps, lr=o.local_lr,
                            batch_tokens=4096, device=run.device, dtype=run.dtype, seed=o.seed, inputs=o.local_inputs,
                            progress=o.progress, on_layer=hand_off, spill_dir=run.spill.folder, fit=_local_fit(run))
        run.record["stages"].append({"stage": "local", "inputs": o.local_inputs, "steps_per_layer": o.local_steps,
                                     "lr": o.local_lr, "tokens": int(local_ids.numel()), **sampled,
                                     "layers": {str(k): v for k, v in sorted(local.layers.items())}})
    if run.world.sharded and run.kd_steps > 0:
        _share_local(run)


def _share_local(run: _Run) -> None:
    """Rank 0's parked local-stage values on every rank, one layer at a time."""
    groups = broadcast({"groups": run.spill.value_groups()}, run.world)["groups"]
    for group in groups:
        values = broadcast(run.spill.values(group) if run.world.rank == 0 else {}, run.world)
        if run.world.rank != 0:
            run.spill.put_values(group, values)


def _check_novices(pairing: Pairing, options: HealOptions) -> None:
    """MoNE novice students get the layer-local fit only (`prune --novices --refit`): the distillation and the
    adapters do not handle novices."""
    if not pairing.novices:
        return
    if options.kd_steps != 0 or options.lora:
        raise HealError(f"{pairing.student.config_path}: a MoNE novice student is healed by the layer-local stage "
                        "only: give --kd-steps 0 and no --lora (or use `prune --novices --refit`)")


def _local_fit(run: _Run):
    """The block fit: expert by expert when chosen (or when only it fits), adapters with --lora, else the joint fit."""
    from surgery.refine.heal.expertwise import expert_fit, supports

    if (run.record["local_fit"] == "experts" and supports(run.pairing.teacher_layout.spec.expert_math)
            and not run.pairing.novices):  # the expert-by-expert fit knows nothing of the novices' constants
        return expert_fit
    run.record["local_fit"] = "joint"
    return lora_fit(run.options.lora) if run.options.lora else None


def _distill(run: _Run) -> None:
    """Stage 2: logits distillation from the teacher (surgery.refine.heal.distill), from the local stage's weights;
    rank 0 then encodes the trained values a layer at a time."""
    o = run.options
    if run.kd_steps <= 0:
        return
    from surgery.model.load import load_model
    from surgery.refine.heal.distill import distill_stage

    teacher = _loaded(run, load_model(run.pairing.teacher.dir, str(run.device), run.dtype))
    # LoRA: the frozen student in the compute dtype (autocast on a GPU), else float32 master weights
    frozen_dtype = run.dtype if o.lora and run.device.type == "cuda" else torch.float32
    student = _loaded(run, load_model(run.pairing.student.dir, str(run.device), frozen_dtype))
    local_names: set[str] = set()
    with torch.no_grad():
        for group in run.spill.value_groups():  # one layer of the local stage's values in RAM at a time
            for name, value in run.spill.values(group).items():
                student.get_parameter(name).copy_(value)
                local_names.add(name)
    lora = lora_student(student, run.pairing, o.lora, o.seed) if o.lora else None
    if run.world.sharded:
        student, teacher = shard(student, run.device, run.world), shard(teacher, run.device, run.world)
    recipe = MoEPrunerObjective(run.pairing, teacher, student) if o.recipe == "moe-pruner" else None
    train = "all" if recipe is not None and not o.lora else o.train  # MoE-Pruner fine-tunes every parameter
    kd = distill_stage(run.pairing, teacher, student, split(list(run.train_ids.split(o.batch_size)), run.world),
                       list(run.held_ids.split(o.batch_size)), steps=run.kd_steps,
                       lr=o.lr or RECIPE_LR[o.recipe], train=train, device=run.device, seed=o.seed,
                       progress=o.progress and run.world.rank == 0,
                       params=lora.params if lora else None, objective=recipe,
                       snapshot_dtype=None if lora else snapshot_dtype(run.pairing, train == "all"))
    values = lora.merged() if lora else kd.params
    kd.record["tokens"] = total(kd.record["tokens"], run.world)
    if lora:
        kd.record["lora_rank"] = o.lora
    run.record["stages"].append({"stage": "distill", **kd.record})
    if run.world.rank == 0:
        _put_trained(run, values, local_names)


def _put_trained(run: _Run, values: dict[str, torch.Tensor], local_names: set[str]) -> None:
    """The trained values (or, for a local-stage value distillation did not train, the parked one) encoded a
    layer at a time."""
    for group, members in run.writer.by_layer(sorted(local_names | set(values))).items():
        parked = run.spill.values(group) if group in run.spill.value_groups() else {}
        run.writer.put(group, {n: values[n] if n in values else parked[n] for n in members})
        if parked:
            run.spill.drop_values(group)
