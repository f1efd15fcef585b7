"""`moe-surgery push`: upload a pruned checkpoint folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

from pathlib import Path

import click

from surgery.cli.options import eval_results_option, private_option, revision_option


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@private_option
@revision_option
@click.option("--commit-message", help="Commit title (default: 'Upload pruned checkpoint (moe-surgery VERSION)').")
@click.option("--include-stats", type=click.Path(dir_okay=False, path_type=Path),
              help="Also upload this statistics file, as moe_surgery/<file name> in the repository.")
@eval_results_option
def push(out_dir: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         include_stats: Path | None, eval_results: Path | None) -> None:
    """Upload OUT_DIR to the Hub repository REPO_ID (org/name), creating the repository if needed.

    --revision names the branch committed to (default: main). The folder must pass `moe-surgery verify`. All files go in one commit, so a failed push
    changes nothing in the repository; the local folder is never modified. The token comes from
    HF_TOKEN or `hf auth login`. With --eval-results, the uploaded model card carries the scores.
    """
    from surgery.hub.card_eval import read_eval_results
    from surgery.hub.client import push_folder
    from surgery.hub.model_card import card_for_push

    card = card_for_push(out_dir, read_eval_results(eval_results)) if eval_results else None
    url = push_folder(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                      include_stats=include_stats, card=card)
    click.echo(f"Pushed {out_dir} to {repo_id}: {url}")
