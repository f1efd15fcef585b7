"""`moe-surgery collect`: one calibration pass writes the statistics file (surgery.collect.run)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from surgery.cli.options import (
    FILE, RenamedOptions, collect_options, data_option, output_option, overwrite_option, revision_option, seed_option,
)
from surgery.collect.options import CollectOptions
from surgery.errors import UserError


@click.command(cls=RenamedOptions, renamed={"--progressive": "--progressive-plan"})
@click.argument("model")
@data_option()
@output_option()
@collect_options
@seed_option
@click.option("--hidden-states", type=click.Choice(["auto", "gpu", "cpu", "disk"]), default="auto", show_default=True,
              help="When streaming (--stream-layers, or auto on a model too large for the device): where the "
                   "hidden states between layers are kept; auto = accelerator if they fit, else RAM, else a "
                   "memory-mapped file beside OUTPUT.")
@click.option("--progressive-plan", "progressive_plan", type=FILE,
              help="Plan JSON (original ids): its layers are pruned in memory while collecting, so later layers see "
                   "the pruned model's inputs; their dropped experts get zero statistics. (Formerly --progressive.)")
@click.option("--histogram", is_flag=True,
              help="Also store a log-grid histogram of every routed expert output value (for mcs-eao); "
                   "it bins each value, so it costs several times the other statistics on a GPU.")
@click.option("--merge-stats", is_flag=True,
              help="Also store every expert's output summed over every token (routed or not) and the router-logit "
                   "Gram, which `prune --merge hc-smoe` / `mc-smoe` read; runs every expert on every token "
                   "(E / top-k times the experts' compute).")
@overwrite_option
@revision_option
def collect(model: str, data: tuple[str, ...], output: Path, collecting: CollectOptions, seed: int, hidden_states: str,
            progressive_plan: Path | None, histogram: bool, merge_stats: bool, overwrite: bool,
            revision: str | None) -> None:
    """Run calibration text through MODEL (a folder or a Hub repo id) once and write its per-expert statistics file.

    Routing (top-k ids and applied gate weights) is taken from the model itself; a self-check
    on the first batch compares our per-expert outputs with the MoE block's real output.
    Under torchrun, each rank takes a disjoint share of the sequences and the sums are reduced.
    """
    from surgery.collect.run import check_output, collect as run_collect
    from surgery.hub.client import resolve_model

    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists (use --overwrite to replace it)")
    check_output(output)  # before any download or model load
    model_dir = resolve_model(model, revision=revision, purpose="collect")
    progressive = None
    if progressive_plan is not None:
        from surgery.plan.document import read_plan_for

        progressive = read_plan_for(progressive_plan, model_dir)
    options = replace(collecting, seed=seed, hidden_states=hidden_states, progress=True, progressive=progressive,
                      histogram=histogram, merge_stats=merge_stats)
    summary = run_collect(model_dir, list(data), output, options)
    if summary.rank == 0:
        for line in summary.lines():
            click.echo(line)
        click.echo(f"Wrote {output}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The file is written and the group torn down; torch's gloo/autograd teardown can still abort a rank
        # at interpreter exit ("terminate called without an active exception"), failing a clean launch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
