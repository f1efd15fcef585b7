"""`moe-surgery score`: rank experts and write a keep plan (JSON) for `prune` (surgery.pipeline.score)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from stats_formats import atomic_write_text

from surgery.cli.options import output_option, overwrite_option, score_options
from surgery.errors import UserError
from surgery.pipeline.score import GLOBAL_WARNING, ScoreOptions, build_plan, criterion, load_source
from surgery.plan import Plan


def _summary(plan: Plan, output: Path) -> str:
    counts = list(plan.counts.values())
    kept = str(counts[0]) if plan.uniform else f"{min(counts)}-{max(counts)} (non-uniform)"
    lines = [f"Wrote {output}: {plan.criterion} keeps {kept} of {plan.extra['num_experts']} experts "
             f"in each of {len(counts)} MoE layers"]
    auto = plan.extra.get("auto")
    if auto:
        lines += [f"  {name:<15} held-out error {err:.6g}" for name, err in auto["errors"].items()]
        lines.append(f"  winner: {auto['winner']}")
    return "\n".join(lines)


@click.command("score")
@click.argument("stats_path", metavar="[STATS]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@score_options(required=True)
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint folder, for the weight criteria (weight_norm, aimer, mcs-ewn, mcs-wsr, mcs-ews, "
                   "mcs-rwn) and random without STATS.")
@output_option()
@overwrite_option
def score_cmd(stats_path: Path | None, scoring: ScoreOptions, model_dir: Path | None, output: Path,
              overwrite: bool) -> None:
    """Score experts and write a keep plan for `moe-surgery prune`.

    Give exactly one of --ratio and --keep; every layer keeps at least top_k experts.
    Group-limited routers (n_group > 1, e.g. DeepSeek-V3) keep the same number of experts in
    every group, chosen within the group, so the kept count must be a multiple of n_group.
    --global gives non-uniform plans, which vanilla transformers cannot load.
    STATS may be left out for weight-only criteria (aimer, weight_norm, ...) and random with --model.
    """
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    if scoring.global_rank:
        click.echo(GLOBAL_WARNING, err=True)
    crit = criterion(scoring.criterion)
    plan = build_plan(crit, load_source(crit, stats_path, model_dir), scoring)
    try:
        atomic_write_text(output, json.dumps(plan.to_json(), indent=1) + "\n")  # never a half-written plan
    except OSError as e:
        raise UserError(f"{output}: cannot write ({e.strerror or e})") from e
    click.echo(_summary(plan, output))
