"""The `moe-surgery` command line: one click group, every command a thin layer over the pipeline.

Commands living in other modules are imported only when used, so `prune` and `verify`
never import torch (peak memory of a rewrite stays tens of MiB).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from surgery import __version__
from surgery.architectures import ArchitectureError, supported
from surgery.cli.options import drop_option
from surgery.errors import UserError

LAZY_COMMANDS = {
    "collect": ("surgery.cli.collect", "collect"),
    "criteria": ("surgery.cli.score", "criteria_cmd"),
    "score": ("surgery.cli.score", "score_cmd"),
    "stats": ("surgery.cli.stats", "stats"),
    "eval": ("surgery.cli.eval", "eval_cmd"),
    "demo": ("surgery.cli.demo", "demo"),
    "push": ("surgery.cli.push", "push"),
    "sparsify": ("surgery.cli.sparsify", "sparsify"),
    "heal": ("surgery.cli.heal", "heal"),
}


def _user_errors() -> tuple[type[Exception], ...]:
    from stats_formats import StatsError

    return (UserError, ArchitectureError, StatsError)


class SurgeryGroup(click.Group):
    """Lazy subcommands; bad-input exceptions become one line on stderr and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)


@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-surgery")
def main() -> None:
    """Make Mixture-of-Experts checkpoints smaller by removing experts.

    Typical flow: `collect` statistics once, `prune` with a criterion (or a hand-made
    plan), `eval` the result, `verify` the files. Checkpoints are read from memory-mapped
    safetensors shards and never loaded whole.
    """


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True, help="New checkpoint folder.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help='Hand-made or `score`-made JSON plan: {"keep": {"<layer>": [expert ids]}}; layers not named stay untouched.')
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics file from `collect` (with --criterion): score and rewrite in one command.")
@click.option("--criterion", help="Criterion name (see `moe-surgery criteria`); aimer, weight_norm and random need no --stats.")
@click.option("--ratio", type=float, help="Fraction of experts removed per MoE layer (0.25 removes 25%).")
@click.option("--keep", "keep_k", type=int, help="Experts kept per MoE layer (instead of --ratio).")
@click.option("--global", "global_rank", is_flag=True,
              help="Rank experts across layers (implies a non-uniform plan; needs --allow-nonuniform).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the `random` criterion.")
@drop_option
@click.option("--holdout-stats", type=click.Path(dir_okay=False, path_type=Path),
              help="For `auto`: a second statistics file whose data serves as the held-out slice.")
@click.option("-d", "--data", multiple=True,
              help="Calibration text (as for `collect`; repeatable): collect here instead of --stats; --seed also "
                   "shuffles it.")
@click.option("--rounds", type=int,
              help="With -d: N rounds of collect → score → remove (E-K)/N experts, each collecting on the model "
                   "pruned so far; pruning.json records every round and maps kept experts to original ids.")
@click.option("--progressive", "progressive_mode", is_flag=True,
              help="With -d: the rounds prune blocks of MoE layers top to bottom instead, each block scored with "
                   "the blocks above it pruned in memory while collecting.")
@click.option("--heal-between", type=click.Choice(["local", "kd", "both"]),
              help="With --rounds: after each round's removal, heal against the checkpoint it was cut from "
                   "(`heal` stages: layer-local fit, logits distillation, or both) before re-estimating.")
@click.option("--heal-tokens", default=65536, show_default=True,
              help="With --heal-between: calibration tokens per round's heal.")
@click.option("--samples", default=256, show_default=True, help="With -d: calibration sequences.")
@click.option("--seq-len", default=2048, show_default=True, help="With -d: tokens per sequence.")
@click.option("--holdout", default=32, show_default=True, help="With -d: held-out sequences (for `auto`).")
@click.option("--batch-size", default=4, show_default=True, help="With -d: sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="With -d: auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="With -d: model dtype while collecting.")
@click.option("--stream-layers", is_flag=True, help="With -d: collect one decoder layer at a time.")
@click.option("--novices", is_flag=True,
              help="With --stats: replace each removed expert by its mean output (a MoNE novice); keeps expert "
                   "ids, router and config expert count, in the format vLLM serves (approximate_experts).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-nonuniform", is_flag=True,
              help="Allow different expert counts per layer. config.json holds one count, so vanilla "
                   "transformers cannot load such a checkpoint; counts go to moe_surgery_experts_per_layer.")
@click.option("--hash-shards", is_flag=True,
              help="Record the sha256 of every source shard in pruning.json (one more pass over the input's bytes, "
                   "CPU-bound; free for Hub-cache inputs, whose blobs are named by it). Header hashes are always recorded.")
@click.option("--revision", help="Branch, tag or commit when MODEL is a Hub repo id (or write org/name@REV).")
@click.option("--push-to-hub", "push_repo", metavar="REPO_ID", help="Then upload OUT_DIR to this Hub repo in one commit.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository as private.")
def prune(model: str, out_dir: Path, plan_path: Path | None, stats_path: Path | None, criterion: str | None,
          ratio: float | None, keep_k: int | None, global_rank: bool, seed: int, drop: str | None,
          holdout_stats: Path | None, overwrite: bool, allow_nonuniform: bool, hash_shards: bool, revision: str | None,
          push_repo: str | None, private: bool, data: tuple[str, ...], rounds: int | None, progressive_mode: bool,
          novices: bool, heal_between: str | None, heal_tokens: int,
          **collect_options) -> None:
    """Write a checkpoint of MODEL keeping only some experts: from --plan, or from
    --stats + --criterion + --ratio/--keep, or from -d DATA + --criterion (collecting first, in
    --rounds N steps, or --progressive by layer blocks).

    MODEL is a local folder or a Hub repo id (org/name[@revision]); from the Hub only config,
    index, tokenizer files and the shards are downloaded. A model card (README.md) is written
    unless the folder holds one you edited.

    Works on the bytes of the safetensors shards: kept experts are renumbered 0..k-1, fused
    expert tensors and router rows are sliced, dtypes are never converted, the model is never
    loaded. Plans must keep the same number of experts in every MoE layer (one count in
    config.json) unless --allow-nonuniform, and the same number in every router group for
    group-limited routers (DeepSeek-V3, GLM-4.5 with n_group > 1). A statistics file collected
    on a different model is refused. Architectures:
    """
    import shlex

    from surgery.hub.client import check_can_push, push_folder, resolve_model
    from surgery.hub.model_card import keep_user_card, write_model_card
    from surgery.plan.document import load_plan
    from surgery.rewrite.experts import rewrite_checkpoint

    if push_repo:
        check_can_push(push_repo)  # no token / offline: fail before the rewrite
    if (plan_path is None) == (criterion is None):
        raise UserError("give either --plan PLAN.json or --criterion NAME (with --stats and --ratio/--keep)")
    if drop is not None and criterion is not None:
        from surgery.criteria import CRITERIA
        from surgery.criteria import oriented

        if criterion in CRITERIA:
            oriented(CRITERIA[criterion], drop)  # refuses recon and auto before any collecting
    model_dir = resolve_model(model, revision=revision, purpose="prune")
    iterate = bool(data or rounds or progressive_mode)
    if heal_between and not (data and rounds):
        raise UserError("--heal-between goes with -d DATA and --rounds N (it heals between rounds)")
    if iterate and (plan_path is not None or stats_path is not None or global_rank):
        raise UserError("-d/--rounds/--progressive collect their own statistics: drop --plan, --stats and --global")
    if novices and stats_path is None and not iterate:
        raise UserError("--novices needs --stats (or -d DATA): the novice vectors are the mean expert outputs it holds")
    if plan_path is not None:
        keep, doc = load_plan(plan_path)
        source = str(plan_path)
    elif not iterate:
        doc = _score(model_dir, stats_path, criterion, ratio, keep_k, global_rank, seed, holdout_stats, drop)
        keep = {int(layer): ids for layer, ids in doc["keep"].items()}
        source = f"{criterion} plan"
    calibration = None
    with keep_user_card(out_dir, model_dir):
        if iterate:
            calibration = _prune_rounds(model_dir, out_dir, list(data), rounds, progressive_mode, criterion, ratio,
                                        keep_k, seed, holdout_stats, collect_options, novices=novices, drop=drop,
                                        heal_between=heal_between, heal_tokens=heal_tokens,
                                        overwrite=overwrite, hash_shards=hash_shards)
        elif novices:
            _write_novices(model_dir, keep, stats_path, out_dir, overwrite=overwrite, plan_doc=doc, plan_source=source,
                           hash_shards=hash_shards)
        else:
            rewrite_checkpoint(model_dir, keep, out_dir, allow_nonuniform=allow_nonuniform, overwrite=overwrite,
                               plan_doc=doc, plan_source=source, progress=True, hash_shards=hash_shards)
    provenance = json.loads((out_dir / "pruning.json").read_text())
    if stats_path is not None:
        from stats_formats import StatsFile

        calibration = StatsFile(stats_path).calibration
    if not write_model_card(out_dir, model, provenance, calibration=calibration,
                            command=shlex.join(["moe-surgery", *sys.argv[1:]])):
        click.echo(f"Kept the edited {out_dir / 'README.md'}; its numbers may describe an earlier prune.", err=True)
    _report_written(out_dir)
    if push_repo:
        click.echo(f"Pushed to {push_repo}: {push_folder(out_dir, push_repo, private=private)}")


def _write_novices(model_dir: Path, keep: dict[int, list[int]], stats_path: Path, out_dir: Path, **options) -> None:
    """The --novices branch of prune: same plan, removed experts become mean-output constants."""
    from stats_formats import StatsFile

    from surgery.io.identity import check_stats_match
    from surgery.rewrite.novices import write_novice_checkpoint

    stats = StatsFile(stats_path)
    check_stats_match(model_dir, stats)
    write_novice_checkpoint(model_dir, keep, stats, out_dir, progress=True, **options)
    memory = json.loads((out_dir / "pruning.json").read_text())["memory"]
    click.echo(f"Novices: {memory['novice_params']} values added; parameters {memory['params_before']} → "
               f"{memory['params_after']}, bytes {memory['bytes_before']} → {memory['bytes_after']}.")


def _score(model_dir: Path, stats_path: Path | None, criterion: str, ratio: float | None, keep_k: int | None,
           global_rank: bool, seed: int, holdout_stats: Path | None, drop: str | None = None) -> dict:
    """Build the plan in memory, refusing statistics that belong to another model."""
    from surgery.cli.score import GLOBAL_WARNING, build_plan, load_source
    from surgery.criteria import CRITERIA
    from surgery.io.identity import check_stats_match

    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if (ratio is None) == (keep_k is None):
        raise UserError("give exactly one of --ratio and --keep")
    crit = CRITERIA[criterion]
    weights_dir = model_dir if crit.needs == "weights" or stats_path is None else None
    src = load_source(crit, stats_path, weights_dir)
    if src.stats is not None:
        check_stats_match(model_dir, src.stats)
    if global_rank:
        click.echo(GLOBAL_WARNING, err=True)
    return build_plan(crit, src, ratio=ratio, keep=keep_k, global_rank=global_rank, seed=seed,
                      holdout_stats=holdout_stats, drop=drop)


def _prune_rounds(model_dir: Path, out_dir: Path, data: list[str], rounds: int | None, progressive_mode: bool,
                  criterion: str, ratio: float | None, keep_k: int | None, seed: int, holdout_stats: Path | None,
                  collect_options: dict, novices: bool, drop: str | None = None, heal_between: str | None = None,
                  heal_tokens: int = 65536, **rewrite_kw) -> dict | None:
    """Collect, score and rewrite in rounds (surgery.pipeline.rounds); returns the first round's calibration record."""
    from surgery.pipeline.rounds import prune_in_rounds

    def score(model: Path, stats: Path | None, keep: int) -> dict:
        return _score(model, stats, criterion, None, keep, False, seed, holdout_stats, drop)

    heal = None
    if heal_between is not None:
        if not rounds:
            raise UserError("--heal-between goes with --rounds N (it heals between rounds)")
        from surgery.refine.heal.run import heal as run_heal

        stages = {"local": {"kd_steps": 0}, "kd": {"local_steps": 0}, "both": {}}[heal_between]

        def heal(student: Path, teacher: Path, out: Path) -> dict:
            return run_heal(student, teacher, data, out, tokens=heal_tokens, kd_tokens=heal_tokens,
                            seq_len=collect_options["seq_len"],
                            batch_size=collect_options["batch_size"], device=collect_options["device"], seed=seed,
                            synthesize=False, progress=False, **stages)  # kept light: no teacher samples

    result, calibration = prune_in_rounds(model_dir, out_dir, data=data, rounds=rounds,
                                          progressive_mode=progressive_mode, criterion=criterion, ratio=ratio,
                                          keep=keep_k, score=score, collect_options={**collect_options, "progress": True}, seed=seed,
                                          novices=novices, heal=heal, **rewrite_kw)
    for line in result.lines():
        click.echo(line, err=True)
    return calibration


prune.help = (prune.help or "") + " " + ", ".join(supported()) + "."


def _report_written(out_dir: Path) -> None:
    info = json.loads((out_dir / "pruning.json").read_text())
    click.echo(
        f"Wrote {out_dir}: {info['num_experts_before']} → {info['num_experts_after']} experts per MoE layer "
        f"({info['model_type']}, {len(info['experts_per_layer'])} MoE layers)."
    )


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
def verify(model_dir: Path) -> None:
    """Re-open every shard and check headers, offsets, the index, and expert shapes against config.json."""
    from surgery.hub.verify import verify_checkpoint

    problems = verify_checkpoint(model_dir)
    if problems:
        for p in problems:
            click.echo(f"Error: {p}", err=True)
        sys.exit(1)
    click.echo(f"{model_dir}: OK")


@main.command("architectures")
def architectures_cmd() -> None:
    """List the supported model_type values."""
    for name in supported():
        click.echo(name)


