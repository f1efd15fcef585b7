"""`moe-surgery criteria`: every criterion with what it reads and its formula."""

from __future__ import annotations

import click

from surgery.criteria import CRITERIA


@click.command("criteria")
def criteria_cmd() -> None:
    """List every criterion with what it reads and its formula (higher score = keep)."""
    width = max(map(len, CRITERIA))
    for crit in CRITERIA.values():
        click.echo(f"{crit.name:<{width}}  needs {crit.needs:<7}  {crit.formula}")
