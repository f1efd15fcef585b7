"""`moe-surgery prune`: write a checkpoint keeping only some experts (surgery.pipeline.prune). Imports no torch."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click

from surgery.architectures import supported
from surgery.cli.options import (
    COUNT, FILE, TEXT, collect_options, data_option, eval_results_option, option_group, output_option,
    private_option, revision_option,
    score_options, stats_option, overwrite_option,
)
from surgery.pipeline.merge import METHODS, REFIT_SEQ_LEN, MergeOptions
from surgery.pipeline.prune import PushOptions, RoundsOptions, WriteOptions, prune as run_prune

rounds_options = option_group(
    "rounds", RoundsOptions,
    data_option(required=False),
    click.option("--rounds", type=int,
                 help="With -d: N rounds of collect → score → remove (E-K)/N experts, each collecting on the model "
                      "pruned so far; pruning.json records every round and maps kept experts to original ids."),
    click.option("--progressive", is_flag=True,
                 help="With -d: the rounds prune blocks of MoE layers top to bottom instead, each block scored with "
                      "the blocks above it pruned in memory while collecting."),
    click.option("--heal-between", type=click.Choice(["local", "kd", "both", "lottery"]),
                 help="With --rounds: after each round's removal, fine-tune before re-estimating: local, kd or both "
                      "heal against the checkpoint it was cut from (`heal`'s stages: layer-local fit, logits "
                      "distillation, or both); lottery is MC-Suite's MoE-Lottery (next-token cross-entropy on -d "
                      "DATA, every weight, AdamW with cosine decay, batch 8, a fresh optimizer each round)."),
    click.option("--heal-tokens", type=COUNT,
                 help="With --heal-between: calibration tokens of round 1's fine-tune (then per --heal-schedule). "
                      "Default: 65536 for local/kd/both, 200000 (MC-Suite's 0.2M) for lottery."),
    click.option("--heal-lr", type=click.FloatRange(0, min_open=True),
                 help="With --heal-between: peak learning rate of every round's fine-tune (local, kd, both: of each "
                      "stage). Default: heal's (3e-4 local fit, 5e-4 distillation); lottery: 1e-6 (MC-Suite)."),
    click.option("--heal-schedule", type=click.Choice(["constant", "doubling"]),
                 help="With --heal-between: --heal-tokens in every round (constant), or doubling each round. "
                      "Default: doubling for lottery (MC-Suite), constant otherwise."),
)

write_options = option_group(
    "write", WriteOptions,
    overwrite_option,
    click.option("--allow-nonuniform", is_flag=True,
                 help="Allow different expert counts per layer. config.json holds one count, so vanilla "
                      "transformers cannot load such a checkpoint; counts go to moe_surgery_experts_per_layer."),
    click.option("--hash-shards", is_flag=True,
                 help="Record the sha256 of every source shard in pruning.json (one more pass over the input's "
                      "bytes, CPU-bound; free for Hub-cache inputs, whose blobs are named by it). Header hashes are "
                      "always recorded."),
    click.option("--novices", is_flag=True,
                 help="With --stats or -d DATA: replace each removed expert by its mean output (a MoNE novice); keeps expert "
                      "ids, router and config expert count, in the format vLLM serves (approximate_experts). With "
                      "--calib-text the refit then fits the kept experts and router rows around the novices."),
)

merge_options = option_group(
    "merging", MergeOptions,
    click.option("--merge", type=click.Choice(METHODS),
                 help="Fold the removed experts into the kept ones instead of dropping them (needs --stats): hc-smoe "
                      "(HC-SMoE clusters; `collect --merge-stats`), mc-smoe (MC-SMoE router-logit groups, aligned "
                      "neurons; `collect --merge-stats`) or lsq (the plan's kept experts absorb their most similar "
                      "removed ones, least squares on the routed second moments). Same plain layout, fewer experts; "
                      "pruning.json records which original experts each new one stands for."),
    click.option("--refit/--no-refit", default=None,
                 help="Then fit the pruned MoE blocks (router rows and experts) to the original's outputs, one layer "
                      "at a time: heal's layer-local stage, without distillation. Needs --calib-text; on by default "
                      "when --calib-text is given (it beat plain removal on every model and ratio measured). "
                      f"Sequences of {REFIT_SEQ_LEN} tokens unless --seq-len is given."),
    click.option("--calib-text", "text", multiple=True, type=TEXT,
                 help="Calibration text (file or folder, repeatable) for --refit, and for --criterion auto, which "
                      "then ranks every candidate plan (criterion x drop/merge) by its held-out next-token loss."),
    click.option("--refit-tokens", type=click.IntRange(min=1), default=262144, show_default=True,
                 help="With --refit: at most this many tokens of --calib-text to fit on (all of it when shorter; "
                      "one sequence in 16 held out)."),
    click.option("--refit-steps", type=click.IntRange(min=1), default=600, show_default=True,
                 help="With --refit: Adam steps per MoE layer."),
)

push_options = option_group(
    "push", PushOptions,
    click.option("--push-to-hub", "repo", metavar="REPO_ID", help="Then upload OUTPUT to this Hub repo in one commit."),
    private_option,
)


@click.command()
@click.argument("model")
@output_option()
@click.option("--plan", "plan_path", type=FILE,
              help='Hand-made or `score`-made JSON plan: {"keep": {"<layer>": [expert ids]}}; layers not named stay '
                   'untouched.')
@stats_option
@score_options()
@rounds_options
@collect_options
@write_options
@merge_options
@revision_option
@push_options
@eval_results_option
def prune(model: str, output: Path, plan_path: Path | None, stats_path: Path | None, scoring, rounds, collecting, write,
          merging, revision: str | None, push, eval_results: Path | None) -> None:
    """Write a checkpoint of MODEL keeping only some experts: from --plan, or from
    --stats + --criterion + --ratio/--keep, or from -d DATA + --criterion (collecting first, in
    --rounds N steps, or --progressive by layer blocks; --seed also shuffles DATA).

    MODEL is a local folder or a Hub repo id (org/name[@revision]); from the Hub only config,
    index, tokenizer files and the shards are downloaded. A model card (README.md) is written
    unless the folder holds one you edited.

    Works on the bytes of the safetensors shards: kept experts are renumbered 0..k-1, fused
    expert tensors and router rows are sliced, dtypes are never converted, the model is never
    loaded (except for --refit and --criterion auto with --calib-text; --merge rewrites the kept
    experts' tensors with merged values in their on-disk dtype). Plans must keep the same number of experts in every MoE layer (one count in
    config.json) unless --allow-nonuniform, and the same number in every router group for
    group-limited routers (DeepSeek-V3, GLM-4.5 with n_group > 1). A statistics file collected
    on a different model is refused. Architectures:
    """
    if click.get_current_context().get_parameter_source("seq_len") is not click.core.ParameterSource.DEFAULT:
        merging = dataclasses.replace(merging, seq_len=collecting.seq_len)  # else the refit's own default
    run_prune(model, output, scoring=scoring, plan_path=plan_path, stats_path=stats_path, rounds=rounds,
              collect=collecting, write=write, push=push, revision=revision, eval_results=eval_results,
              command=shlex.join(["moe-surgery", *sys.argv[1:]]), echo=click.echo, merging=merging)


prune.help = (prune.help or "") + " " + ", ".join(supported()) + "."
