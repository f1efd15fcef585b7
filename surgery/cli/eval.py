"""`moe-surgery eval`: perplexity of a checkpoint, optionally compared with a reference (surgery.pipeline.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery.cli.options import (
    batch_size_option, data_option, device_option, dtype_option, option_group, revision_option, seq_len_option,
)
from surgery.pipeline.evaluate import EvalOptions, evaluate_model

eval_options = option_group(
    "options", EvalOptions,
    click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
                 help="Tokens read from each data file."),
    seq_len_option(512), batch_size_option(8), device_option, dtype_option,
)


@click.command("eval")
@click.argument("model")
@data_option()
@click.option("--reference", type=click.Path(),
              help="Another model folder (e.g. the unpruned original) to compare against: adds "
                   "KL(reference || model) and top-1 agreement.")
@eval_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@revision_option
def eval_cmd(model: str, data: tuple[str, ...], reference: str | None, options: EvalOptions, as_json: bool,
             revision: str | None) -> None:
    """Measure the perplexity of MODEL (a local checkpoint folder or a Hub repo id) on each
    DATA file, plus the geometric mean over files.

    Each file is read in order and cut into non-overlapping windows of --seq-len tokens,
    up to --max-tokens per file. With --reference, also reports how far MODEL's next-token
    distributions moved from the reference's (both use MODEL's tokenizer).
    """
    from surgery.eval.perplexity import format_report
    from surgery.hub.client import is_repo_id
    from surgery.hub.model_card import update_card_eval

    result = evaluate_model(model, data, options, reference=reference, revision=revision)
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))
    if not is_repo_id(model) and update_card_eval(Path(model), result):
        click.echo(f"Added the results to {model}/README.md", err=True)
