"""`moe-surgery verify`: re-open a checkpoint's shards and check them against config.json. Imports no torch."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
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
