"""`moe-surgery verify`: re-open a checkpoint's shards and check them against config.json. Imports no torch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from surgery.errors import UserError


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
def verify(model_dir: Path) -> None:
    """Re-open every shard and check headers, offsets, the index (shard names inside the folder), the
    config's expert counts and every expert shape against config.json.

    \b
    Prints `MODEL_DIR: OK` and exits 0 when the checkpoint is consistent. Otherwise exits 2 with
    one first line on stderr naming the checkpoint,
      Error: MODEL_DIR: N problem(s)
    followed by one line per problem, indented by two spaces (a checkpoint that cannot be read
    at all, e.g. a crafted index, gives one problem).
    """
    from surgery.hub.verify import verify_checkpoint

    try:
        problems = verify_checkpoint(model_dir)
    except UserError as e:
        problems = [str(e)]
    if problems:
        lines = [" ".join(p.split()) for p in problems]
        click.echo(f"Error: {model_dir}: {len(lines)} problem{'s' if len(lines) != 1 else ''}", err=True)
        for line in lines:
            click.echo(f"  {line}", err=True)
        sys.exit(2)
    click.echo(f"{model_dir}: OK")
