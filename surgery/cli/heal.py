"""`moe-surgery heal`: win back a pruned model's quality by distilling from the model it was cut from."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("student")
@click.option("--teacher", required=True,
              help="The checkpoint STUDENT was pruned from (folder or Hub repo id); pruning.json maps the experts.")
@click.option("-d", "--data", "data", multiple=True, required=True,
              help="Calibration text, read exactly as `collect` reads it (.jsonl, .txt or a folder); repeatable.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Healed checkpoint folder (the student's layout, names, dtypes and shards).")
@click.option("--tokens", type=click.IntRange(min=2),
              help="Calibration tokens to read (an error if DATA holds fewer); default all of DATA, up to 8,388,608. "
                   "One sequence in 16 is held out to measure each stage.")
@click.option("--local-steps", default=200, show_default=True,
              help="Layer-local stage: optimizer steps per MoE layer (0 turns the stage off).")
@click.option("--local-tokens", default=2**18, show_default=True,
              help="Layer-local stage: at most this many of the tokens are cached per layer.")
@click.option("--local-inputs", type=click.Choice(["student", "teacher", "both"]), default="student", show_default=True,
              help="Fit each block on the student's own hidden states toward the teacher's layer output "
                   "(sequential: also corrects the drift of the layers below), on the teacher block's "
                   "inputs toward its output, or both (the teacher's pairs as extra training data).")
@click.option("--synthesize/--no-synthesize", default=True, show_default=True,
              help="When DATA gives the layer-local stage fewer than --local-tokens tokens, make up the difference "
                   "with the teacher's own sampled continuations of 32-token prefixes of DATA, up to 3 per real "
                   "sequence (the fit is data-bound; held-out tokens stay real text). Loads the whole teacher "
                   "once to sample.")
@click.option("--local-lr", default=3e-4, show_default=True, help="Layer-local stage learning rate (Adam).")
@click.option("--kd-steps", type=click.IntRange(min=0), default=None,
              help="Distillation stage: optimizer steps of --batch-size sequences; default enough for --kd-tokens; "
                   "0 turns the stage off.")
@click.option("--kd-tokens", type=click.IntRange(min=1), default=8 * 2**20, show_default=True,
              help="Distillation stage: tokens to train on, cycling through the training sequences when DATA is "
                   "shorter; the held-out KL is checked along the way and the best state is kept. Sized for a "
                   "GPU: on a CPU, which distils a few hundred tokens/s, use --kd-steps 0 or far fewer tokens.")
@click.option("--train", type=click.Choice(["experts", "all"]), default="experts", show_default=True,
              help="Distillation trains the router rows and routed experts of pruned layers, or every weight.")
@click.option("--lr", default=5e-4, show_default=True, help="Distillation peak learning rate (AdamW, warm-up + cosine).")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per sequence (capped by the model).")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per step.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Dtype of the teacher and of the streamed layers; auto = bfloat16 on GPU, "
                                      "float32 on CPU. Trained weights are kept in float32 and written back in "
                                      "their on-disk dtype.")
@click.option("--seed", default=0, show_default=True, help="Shuffles documents and minibatches.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--revision", help="Branch, tag or commit when --teacher is a Hub repo id.")
def heal(student: str, teacher: str, data: tuple[str, ...], out_dir: Path, tokens: int | None, local_steps: int,
         local_tokens: int, local_inputs: str, synthesize: bool, local_lr: float, kd_steps: int | None, kd_tokens: int, train: str,
         lr: float,
         seq_len: int, batch_size: int, device: str, dtype: str, seed: int, overwrite: bool,
         revision: str | None) -> None:
    """Distil STUDENT (written by `prune` or `sparsify`) from the checkpoint it was pruned from.

    Stage 1 streams both models one decoder layer at a time and fits each pruned MoE block's
    router rows and kept experts to the teacher (MSE). Stage 2 trains end to end on
    KL(teacher logits || student logits). Trained tensors are written back in their on-disk
    dtype, everything else is copied byte for byte; pruning.json gains a `heal` record.
    Sparsified students keep their zeros and add the expert-wise loss of MoE-Pruner.
    """
    from surgery.refine.heal.run import HealOptions, heal as run_heal
    from surgery.hub.client import resolve_model

    teacher_dir = resolve_model(teacher, revision=revision, purpose="collect")
    options = HealOptions(tokens=tokens, local_steps=local_steps, local_tokens=local_tokens, local_inputs=local_inputs,
                          synthesize=synthesize, local_lr=local_lr, kd_steps=kd_steps, kd_tokens=kd_tokens,
                          batch_size=batch_size, train=train, lr=lr, seq_len=seq_len, device=device, dtype=dtype,
                          seed=seed, overwrite=overwrite, progress=True)
    record = run_heal(student, teacher_dir, list(data), out_dir, options)
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
    click.echo(f"Wrote {out_dir} ({record['tokens']} calibration tokens, {record['seconds']:.0f} s).")
