"""The `moe-surgery` command line: one click group, one module per command, each a thin layer over
surgery.pipeline (options from surgery.cli.options, defined once).

Commands are imported only when used, so `prune` and `verify` never import torch (peak memory of a
rewrite stays tens of MiB). Bad input, and a subcommand's bad or missing option, is turned into one
`Error: ...` line and exit code 2 in one place, SurgeryGroup.invoke.
"""

from __future__ import annotations

import importlib
import sys

import click

from surgery import __version__
from surgery.errors import UserError

LAZY_COMMANDS = {
    "architectures": ("surgery.cli.architectures", "architectures_cmd"),
    "collect": ("surgery.cli.collect", "collect"),
    "criteria": ("surgery.cli.criteria", "criteria_cmd"),
    "demo": ("surgery.cli.demo", "demo"),
    "eval": ("surgery.cli.eval", "eval_cmd"),
    "heal": ("surgery.cli.heal", "heal"),
    "prune": ("surgery.cli.prune", "prune"),
    "push": ("surgery.cli.push", "push"),
    "score": ("surgery.cli.score", "score_cmd"),
    "sparsify": ("surgery.cli.sparsify", "sparsify"),
    "stats": ("surgery.cli.stats", "stats"),
    "verify": ("surgery.cli.verify", "verify"),
}


def _user_errors() -> tuple[type[Exception], ...]:
    # stats_formats is the file format and never imports surgery, so its error cannot derive from UserError.
    from stats_formats import StatsError

    return (UserError, StatsError)


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
        except click.UsageError as e:  # a subcommand's bad option: one line, not click's usage block
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe-surgery")
def main() -> None:
    """Make Mixture-of-Experts checkpoints smaller by removing experts.

    Typical flow: `collect` statistics once, `prune` with a criterion (or a hand-made
    plan), `eval` the result, `verify` the files. Checkpoints are read from memory-mapped
    safetensors shards and never loaded whole.
    """
