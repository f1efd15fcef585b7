"""`moe-surgery collect`: one calibration pass writes the statistics file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from surgery.errors import UserError


@click.command()
@click.argument("model")
@click.option("-d", "--data", "data", multiple=True, required=True,
              help="Calibration text: .jsonl (a `text` field), .txt (blank-line-separated documents) or a folder; repeatable.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Statistics file to write (.safetensors).")
@click.option("--samples", default=256, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per sequence (capped by the model).")
@click.option("--holdout", default=32, show_default=True,
              help="Extra sequences kept aside for held-out error (used by the `auto` criterion); 0 disables.")
@click.option("--seed", default=0, show_default=True, help="Shuffles documents before packing.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model dtype; auto = bfloat16 on GPU, float32 on CPU. Sums are float64.")
@click.option("--stream-layers", is_flag=True,
              help="Materialise one decoder layer at a time from the shards: for models larger than RAM or GPU memory.")
@click.option("--hidden-states", type=click.Choice(["auto", "gpu", "cpu", "disk"]), default="auto", show_default=True,
              help="With --stream-layers: where the hidden states between layers are kept; auto = accelerator if "
                   "they fit, else RAM, else a memory-mapped file beside OUTPUT.")
@click.option("--progressive", "progressive_plan", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan JSON (original ids): its layers are pruned in memory while collecting, so later layers see "
                   "the pruned model's inputs; their dropped experts get zero statistics.")
@click.option("--gradients", is_flag=True,
              help="Also back-propagate each calibration sequence's next-token loss and store per-expert gradient "
                   "statistics (for the mcs-egs/ege/ego/egn criteria); one extra forward and backward pass, "
                   "one sequence at a time (with --stream-layers: one layer at a time, keeping every layer's inputs).")
@click.option("--histogram", is_flag=True,
              help="Also store a log-grid histogram of every routed expert output value (for mcs-eao); "
                   "it bins each value, so it costs several times the other statistics on a GPU.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--revision", help="Branch, tag or commit when MODEL is a Hub repo id (or write org/name@REV).")
def collect(model: str, data: tuple[str, ...], output: Path, samples: int, seq_len: int, holdout: int, seed: int,
            batch_size: int, device: str, dtype: str, stream_layers: bool, hidden_states: str,
            progressive_plan: Path | None, gradients: bool, histogram: bool, overwrite: bool,
            revision: str | None) -> None:
    """Run calibration text through MODEL (a folder or a Hub repo id) once and write its per-expert statistics file.

    Routing (top-k ids and applied gate weights) is taken from the model itself; a self-check
    on the first batch compares our per-expert outputs with the MoE block's real output.
    Under torchrun, each rank takes a disjoint share of the sequences and the sums are reduced.
    """
    from surgery.collect.run import collect as run_collect

    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists (use --overwrite to replace it)")
    from surgery.hub.client import resolve_model

    model_dir = resolve_model(model, revision=revision, purpose="collect")
    progressive = None
    if progressive_plan is not None:
        from surgery.plan.document import read_plan_for

        progressive = read_plan_for(progressive_plan, model_dir)
    summary = run_collect(model_dir, list(data), output, samples=samples, seq_len=seq_len, seed=seed,
                          batch_size=batch_size, holdout=holdout, device=device, dtype=dtype,
                          stream_layers=stream_layers, hidden_states=hidden_states, progress=True,
                          progressive=progressive, gradients=gradients, histogram=histogram)
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
