"""`moe-surgery eval`: perplexity and task accuracy of a checkpoint, optionally compared with a reference
(surgery.pipeline.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery.cli.options import (
    batch_size_option, data_option, device_option, dtype_option, limit_option, num_fewshot_option, option_group,
    revision_option, seq_len_option, stride_option, tasks_option,
)
from surgery.eval.tasks import TaskOptions
from surgery.pipeline.evaluate import EvalOptions, evaluate_model

eval_options = option_group(
    "options", EvalOptions,
    click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
                 help="Tokens read from each data file."),
    seq_len_option(512), stride_option, batch_size_option(8), device_option, dtype_option,
)
task_options = option_group("tasks", TaskOptions, tasks_option, num_fewshot_option, limit_option)


@click.command("eval")
@click.argument("model")
@data_option(required=False)
@task_options
@click.option("--reference", type=click.Path(),
              help="Another model folder (e.g. the unpruned original) to compare against: adds "
                   "KL(reference || model) and top-1 agreement, and runs --tasks on it too (side by side, with deltas).")
@eval_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON instead of a table (the file `prune`/`push --eval-results` read).")
@revision_option
def eval_cmd(model: str, data: tuple[str, ...], tasks: TaskOptions, reference: str | None, options: EvalOptions,
             as_json: bool, revision: str | None) -> None:
    """Measure the perplexity of MODEL (a local checkpoint folder or a Hub repo id) on each
    DATA file, plus the geometric mean over files, and/or its accuracy on --tasks.

    Each file is read in order and cut into windows of --seq-len tokens (every --stride tokens),
    up to --max-tokens per file. With --reference, also reports how far MODEL's next-token
    distributions moved from the reference's (both use MODEL's tokenizer). --tasks run through
    lm-evaluation-harness on the model as this tool loads it (MoNE novice and quantized checkpoints
    included). On a local folder whose model card moe-surgery wrote, the results go into the card.
    """
    from surgery.eval.perplexity import format_report
    from surgery.eval.task_report import format_tasks
    from surgery.hub.client import is_repo_id
    from surgery.hub.model_card import update_card_eval

    result = evaluate_model(model, data, options, reference=reference, revision=revision, tasks=tasks)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        parts = ([format_report(result)] if "files" in result else []) + (
            [format_tasks(result["tasks"])] if "tasks" in result else [])
        click.echo("\n\n".join(parts))
    if not is_repo_id(model) and update_card_eval(Path(model), result):
        click.echo(f"Added the results to {model}/README.md", err=True)
