"""`eval`: resolve the model (and reference), check the text, load, measure perplexity (surgery.eval.perplexity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError


@dataclass(frozen=True)
class EvalOptions:
    """Windows of `seq_len` tokens, at most `max_tokens` per file, `batch_size` windows per forward pass;
    `device` auto/cpu/cuda[:N]/mps; `dtype` "auto" keeps the checkpoint's."""

    max_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"


def data_files(paths) -> list[str]:
    """Folders stand for their .jsonl/.txt files, so that every file (domain) gets its own perplexity."""
    out: list[str] = []
    for p in map(Path, paths):
        out += sorted(str(f) for f in p.rglob("*") if f.suffix in (".jsonl", ".txt")) if p.is_dir() else [str(p)]
    return out


def resolve_device(device: str) -> str:
    """auto → cuda when available, else cpu; refuses cuda without a CUDA device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    return device


def evaluate_model(model: str, data, options: EvalOptions = EvalOptions(), *, reference: str | None = None,
                   revision: str | None = None) -> dict:
    """Perplexity of MODEL (a folder or a Hub repo id) on each DATA file (folders: each file in them),
    with KL and top-1 agreement against `reference` when given. Bad data is refused before any model loads;
    transformers' errors (OSError, ValueError: a folder it cannot load) are reported as bad input."""
    try:
        return _evaluate(model, data, options, reference, revision)
    except (OSError, ValueError) as e:
        raise UserError(str(e).replace("\n", " ")) from e  # transformers' messages can span lines


def _evaluate(model: str, data, options: EvalOptions, reference: str | None, revision: str | None) -> dict:
    from surgery.eval.perplexity import evaluate
    from surgery.hub.client import resolve_model
    from surgery.model.data import DataError, read_documents
    from surgery.model.load import load_model, load_tokenizer

    model_dir = resolve_model(model, revision=revision, purpose="eval")
    ref_dir = resolve_model(reference, purpose="eval") if reference else None
    for folder in [model_dir] + ([ref_dir] if ref_dir else []):
        if not Path(folder).is_dir():
            raise DataError(f"{folder}: no such model folder")
    files = data_files(data)
    for path in files:
        read_documents(path)  # fail on bad data before spending minutes loading a model
    device = resolve_device(options.device)
    dtype = None if options.dtype == "auto" else options.dtype
    tokenizer = load_tokenizer(model_dir)
    lm = load_model(model_dir, device, dtype)
    ref = load_model(ref_dir, device, dtype) if ref_dir else None
    return evaluate(lm, tokenizer, files, seq_len=options.seq_len, max_tokens=options.max_tokens,
                    batch_size=options.batch_size, reference=ref, device=device)
