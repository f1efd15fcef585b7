"""`moe-surgery eval`: perplexity of a checkpoint, optionally compared with a reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from surgery.model.data import DataError, read_documents
from surgery.eval.perplexity import evaluate, format_report
from surgery.model.load import load_model, load_tokenizer


def _per_file(paths) -> list[str]:
    """Folders stand for their .jsonl/.txt files, so that every file (domain) gets its own perplexity."""
    out: list[str] = []
    for p in map(Path, paths):
        out += sorted(str(f) for f in p.rglob("*") if f.suffix in (".jsonl", ".txt")) if p.is_dir() else [str(p)]
    return out


@click.command("eval")
@click.argument("model")
@click.option(
    "-d", "--data", "data", multiple=True, required=True, type=click.Path(),
    help="Evaluation text: .jsonl (a 'text' field per line), .txt (blank-line separated "
    "documents) or a folder of them (each file in it is one domain). Repeatable.",
)
@click.option(
    "--reference", type=click.Path(),
    help="Another model folder (e.g. the unpruned original) to compare against: adds "
    "KL(reference || model) and top-1 agreement.",
)
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Tokens read from each data file.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Window length; capped at the model's max_position_embeddings.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when available, else cpu.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights dtype; auto keeps the checkpoint's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--revision", help="Branch, tag or commit when MODEL is a Hub repo id.")
def eval_cmd(model, data, reference, max_tokens, seq_len, batch_size, device, dtype, as_json, revision):
    """Measure the perplexity of MODEL (a local checkpoint folder or a Hub repo id) on each
    DATA file, plus the geometric mean over files.

    Each file is read in order and cut into non-overlapping windows of --seq-len tokens,
    up to --max-tokens per file. With --reference, also reports how far MODEL's next-token
    distributions moved from the reference's (both use MODEL's tokenizer).
    """
    from surgery.hub.client import is_repo_id, resolve_model
    from surgery.hub.model_card import update_card_eval

    try:
        model_dir = resolve_model(model, revision=revision, purpose="eval")
        ref_dir = resolve_model(reference, purpose="eval") if reference else None
        for folder in [model_dir] + ([ref_dir] if ref_dir else []):
            if not Path(folder).is_dir():
                raise DataError(f"{folder}: no such model folder")
        data = _per_file(data)
        for path in data:
            read_documents(path)  # fail on bad data before spending minutes loading a model
        device = _resolve_device(device)
        dtype = None if dtype == "auto" else dtype
        tokenizer = load_tokenizer(model_dir)
        lm = load_model(model_dir, device, dtype)
        ref = load_model(ref_dir, device, dtype) if ref_dir else None
        result = evaluate(lm, tokenizer, list(data), seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, reference=ref, device=device)
    except (DataError, OSError, ValueError) as e:
        message = str(e).replace("\n", " ")  # transformers' messages can span lines
        click.echo(f"Error: {message}", err=True)
        sys.exit(2)
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))
    if not is_repo_id(model) and update_card_eval(Path(model), result):
        click.echo(f"Added the results to {model}/README.md", err=True)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    return device
