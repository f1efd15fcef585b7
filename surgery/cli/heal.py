"""`moe-surgery heal`: win back a pruned model's quality by distilling from the model it was cut from."""

from __future__ import annotations

import os
from pathlib import Path

import click

from surgery.cli.options import (
    batch_size_option, data_option, device_option, dtype_option, option_group, output_dtype_option, output_option,
    overwrite_option, revision_option, seed_option, seq_len_option,
)
from surgery.refine.heal.run import HealOptions

heal_options = option_group(
    "options", HealOptions,
    click.option("--tokens", type=click.IntRange(min=2),
                 help="Calibration tokens to read (an error if DATA holds fewer); default all of DATA, up to "
                      "8,388,608. One sequence in 16 is held out to measure each stage."),
    click.option("--local-steps", default=200, show_default=True,
                 help="Layer-local stage: optimizer steps per MoE layer (0 turns the stage off)."),
    click.option("--local-tokens", default=2**18, show_default=True,
                 help="Layer-local stage: at most this many of the tokens are cached per layer."),
    click.option("--local-inputs", type=click.Choice(["student", "teacher", "both"]), default="student",
                 show_default=True,
                 help="Fit each block on the student's own hidden states toward the teacher's layer output "
                      "(sequential: also corrects the drift of the layers below), on the teacher block's "
                      "inputs toward its output, or both (the teacher's pairs as extra training data)."),
    click.option("--synthesize/--no-synthesize", default=True, show_default=True,
                 help="When DATA gives the layer-local stage fewer than --local-tokens tokens, make up the difference "
                      "with the teacher's own sampled continuations of 32-token prefixes of DATA, up to 3 per real "
                      "sequence (the fit is data-bound; held-out tokens stay real text). Loads the whole teacher "
                      "once to sample."),
    click.option("--local-lr", default=3e-4, show_default=True, help="Layer-local stage learning rate (Adam)."),
    click.option("--kd-steps", type=click.IntRange(min=0), default=None,
                 help="Distillation stage: optimizer steps of --batch-size sequences; default enough for "
                      "--kd-tokens; 0 turns the stage off."),
    click.option("--kd-tokens", type=click.IntRange(min=1), default=8 * 2**20, show_default=True,
                 help="Distillation stage: tokens to train on, cycling through the training sequences when DATA is "
                      "shorter; the held-out KL is checked along the way and the best state is kept. Sized for a "
                      "GPU: on a CPU, which distils a few hundred tokens/s, use --kd-steps 0 or far fewer tokens."),
    click.option("--train", type=click.Choice(["experts", "all"]), default="experts", show_default=True,
                 help="Distillation trains the router rows and routed experts of pruned layers, or every weight."),
    click.option("--lr", type=float, default=None,
                 help="Distillation peak learning rate (AdamW, warm-up + cosine); default 5e-4, 2e-5 with "
                      "--recipe moe-pruner."),
    click.option("--lora", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Low-rank healing: train rank-R adapters on the pruned layers' experts (and their router rows) "
                      "instead of the expert weights, in both stages, then merge them into the weights: the output is "
                      "a plain checkpoint. Needs about the two models in the compute dtype plus small adapter states "
                      "(see README). 0 trains the weights themselves."),
    click.option("--recipe", type=click.Choice(["default", "moe-pruner"]), default="default", show_default=True,
                 help="default: layer-local fit, then KL distillation of the pruned layers' experts. moe-pruner: "
                      "MoE-Pruner's expert-wise distillation (Eq. 10: next-token CE + lambda * sum of expert-output "
                      "MSEs, lambda equalising the two at the start), full-parameter, lr 2e-5, no layer-local stage."),
    click.option("--local-fit", type=click.Choice(["auto", "joint", "experts"]), default="auto", show_default=True,
                 help="Layer-local stage: fit each pruned block whole (router rows and experts together, float32), "
                      "expert by expert (each expert toward its share of the teacher block's output on its tokens, "
                      "then the router rows; the block stays in its dtype), or auto: expert by expert only when the "
                      "whole block's fit does not fit in the memory budget."),
    click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="GiB the run may use on its device; heal refuses up front, with its estimate, when the run "
                      "needs more. Default: 95% of the device's free memory (the host's available memory on a CPU)."),
    seq_len_option(1024), batch_size_option(8), device_option, dtype_option, output_dtype_option, seed_option,
    overwrite_option,
)


@click.command()
@click.argument("student")
@click.option("--teacher", required=True,
              help="The checkpoint STUDENT was pruned from (folder or Hub repo id); pruning.json maps the experts.")
@data_option()
@output_option()
@heal_options
@revision_option
def heal(student: str, teacher: str, data: tuple[str, ...], output: Path, options: HealOptions,
         revision: str | None) -> None:
    """Distil STUDENT (written by `prune` or `sparsify`) from the checkpoint it was pruned from.

    Stage 1 streams both models one decoder layer at a time and fits each pruned MoE block's
    router rows and kept experts to the teacher (MSE). Stage 2 trains end to end on
    KL(teacher logits || student logits). Trained tensors are written back in their on-disk
    dtype (quantized students: re-encoded in their own scheme, or unquantized with --output-dtype),
    everything else is copied byte for byte; pruning.json gains a `heal` record.
    Sparsified students keep their zeros and add the expert-wise loss of MoE-Pruner.
    OUTPUT gets the student's layout, names, dtypes and shards; DATA is read exactly as `collect` reads it.
    --lora R trains low-rank adapters instead and merges them at the end. The memory the run needs is
    worked out first and the run refused when it does not fit (README: "Healing large models").
    Under `torchrun --nproc-per-node N -m surgery.cli heal ...` the distillation is sharded (FSDP2).
    """
    from surgery.hub.client import resolve_model
    from surgery.hub.model_card import refresh_what
    from surgery.refine.heal.run import heal as run_heal

    teacher_dir = resolve_model(teacher, revision=revision, purpose="collect")
    record = run_heal(student, teacher_dir, list(data), output, options)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 wrote and reports
        refresh_what(output)  # the card copied from the student, when ours, now says the weights were trained
        _report(record, output)


def _report(record: dict, output: Path) -> None:
    for stage in record["stages"]:
        if stage["stage"] == "local":
            errors = [(v["held_out_error_before"], v["held_out_error_after"]) for v in stage["layers"].values()]
            mean_before = sum(b for b, _ in errors) / max(len(errors), 1)
            mean_after = sum(a for _, a in errors) / max(len(errors), 1)
            click.echo(f"Layer-local fit: {len(errors)} layers, mean held-out block error {mean_before:.4f} → "
                       f"{mean_after:.4f}")
            if "teacher_samples" in stage:
                t = stage["teacher_samples"]
                click.echo(f"  on {stage['tokens']} tokens, {t['tokens']} of them sampled from the teacher "
                           f"({t['sequences']} sequences, {t['seconds']:.0f} s; --no-synthesize to skip)")
        else:
            click.echo(f"Distillation: {stage['steps']} steps, {stage['tokens']} tokens, held-out KL "
                       f"{stage['held_out_kl_before']:.4f} → {stage['held_out_kl_after']:.4f}")
    if "requantization" in record:
        q = record["requantization"]
        click.echo(f"Re-encoded {q['tensors']} trained weights in {q['scheme']}: relative error mean "
                   f"{q['relative_error_mean']:.4f}, max {q['relative_error_max']:.4f}")
    if "unquantized_modules" in record:
        click.echo(f"Wrote {len(record['unquantized_modules'])} modules unquantized ({record['output_dtype']}); "
                   "config.json's quantization_config lists them")
    click.echo(f"Wrote {output} ({record['tokens']} calibration tokens, {record['seconds']:.0f} s).")
