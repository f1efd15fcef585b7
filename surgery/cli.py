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


@main.command("architectures")
def architectures_cmd() -> None:
    """List the supported model_type values."""
    for name in supported():
        click.echo(name)


if __name__ == "__main__":
    main()
