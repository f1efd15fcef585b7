"""The `moe-surgery` command line: one click group, every command a thin layer over the pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .architectures import ArchitectureError, supported
from .config_edit import PlanError
from .io import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, ArchitectureError, PlanError)


def _register_user_error(exc: type[Exception]) -> None:
    global USER_ERRORS
    USER_ERRORS = USER_ERRORS + (exc,)


class SurgeryGroup(click.Group):
    """Turns bad-input exceptions into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
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
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True,
              help='JSON plan: {"keep": {"<layer>": [expert ids]}}; layers not named stay untouched.')
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True, help="New checkpoint folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-nonuniform", is_flag=True,
              help="Allow different expert counts per layer. config.json holds one count, so vanilla "
                   "transformers cannot load such a checkpoint; counts go to moe_surgery_experts_per_layer.")
def prune(model_dir: Path, plan_path: Path, out_dir: Path, overwrite: bool, allow_nonuniform: bool) -> None:
    """Write a checkpoint keeping only the experts named in a plan.

    Works on the bytes of the safetensors shards: kept experts are renumbered 0..k-1, fused
    expert tensors and router rows are sliced, dtypes are never converted. Architectures:
    """
    from .rewrite import load_plan, rewrite_checkpoint

    keep, doc = load_plan(plan_path)
    rewrite_checkpoint(model_dir, keep, out_dir, allow_nonuniform=allow_nonuniform, overwrite=overwrite,
                       plan_doc=doc, plan_source=str(plan_path), progress=True)
    _report_written(out_dir)


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
    from .verify import verify_checkpoint

    problems = verify_checkpoint(model_dir)
    if problems:
        for p in problems:
            click.echo(f"Error: {p}", err=True)
        sys.exit(1)
    click.echo(f"{model_dir}: OK")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
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
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def collect(model_dir: Path, data: tuple[str, ...], output: Path, samples: int, seq_len: int, holdout: int, seed: int,
            batch_size: int, device: str, dtype: str, stream_layers: bool, overwrite: bool) -> None:
    """Run calibration text through MODEL_DIR once and write its per-expert statistics file.

    Routing (top-k ids and applied gate weights) is taken from the model itself; a self-check
    on the first batch compares our per-expert outputs with the MoE block's real output.
    Under torchrun, each rank takes a disjoint share of the sequences and the sums are reduced.
    """
    from .collect import collect as run_collect

    if output.exists() and not overwrite:
        raise CheckpointError(f"{output}: already exists (use --overwrite to replace it)")
    summary = run_collect(model_dir, list(data), output, samples=samples, seq_len=seq_len, seed=seed,
                          batch_size=batch_size, holdout=holdout, device=device, dtype=dtype,
                          stream_layers=stream_layers, progress=True)
    if summary.rank == 0:
        for line in summary.lines():
            click.echo(line)
        click.echo(f"Wrote {output}")


@main.command("architectures")
def architectures_cmd() -> None:
    """List the supported model_type values."""
    for name in supported():
        click.echo(name)


def _register() -> None:
    """Attach the commands and bad-input exceptions of the other modules."""
    from stats_formats import StatsError

    from .cli_eval import eval_cmd
    from .cli_score import criteria_cmd, score_cmd
    from .cli_stats import stats
    from .collect import SelfCheckError, StreamingError
    from .data import DataError

    for exc in (StatsError, DataError, SelfCheckError, StreamingError):
        _register_user_error(exc)
    for cmd in (stats, eval_cmd, criteria_cmd, score_cmd):
        main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
