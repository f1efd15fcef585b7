"""`moe-surgery stats`: inspect, merge and export per-expert statistics files."""

from __future__ import annotations

from pathlib import Path

import click

from stats_formats import StatsError, StatsFile, atomic_write_text, merge, summary_table, to_csv, to_json

from surgery.cli.options import output_option, overwrite_option


@click.group()
def stats() -> None:
    """Inspect, merge and export per-expert statistics files."""


@stats.command()
@click.argument("file", type=click.Path(path_type=Path))
def show(file: Path) -> None:
    """Print provenance and a per-layer summary of FILE."""
    click.echo(summary_table(StatsFile(file)))


@stats.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option()
@overwrite_option
def merge_command(files: tuple[Path, ...], output: Path, overwrite: bool) -> None:
    """Combine statistics of disjoint calibration data (same model) into OUTPUT."""
    if output.exists() and not overwrite:
        raise StatsError(f"{output}: already exists; pass --overwrite to replace it")
    merged = merge(list(files), label=str(output))
    merged.save(output)
    click.echo(f"{output}: merged {len(files)} files, {merged.calibration['num_tokens']} calibration tokens")
    dropped = sorted({n for f in files for n in StatsFile(f).optional_fields} - set(merged.optional_fields))
    if dropped:  # kept only when every input has them: say so, since criteria that need them will now refuse
        click.echo(f"Warning: {', '.join(dropped)} dropped (not in every input); criteria that need them "
                   "cannot score the merged file", err=True)


@stats.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@output_option(required=False)
def export(file: Path, fmt: str, output: Path | None) -> None:
    """Export FILE: csv has one row per (layer, expert); json holds metadata and every tensor."""
    stats_file = StatsFile(file)
    text = to_csv(stats_file) if fmt == "csv" else to_json(stats_file) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
