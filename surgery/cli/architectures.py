"""`moe-surgery architectures`: the supported model_type values."""

from __future__ import annotations

import click

from surgery.architectures import supported


@click.command("architectures")
def architectures_cmd() -> None:
    """List the supported model_type values."""
    for name in supported():
        click.echo(name)
