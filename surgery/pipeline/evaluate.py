"""`eval`: resolve the model (and reference), check the text and the tasks, load once, measure perplexity
(surgery.eval.perplexity) and task accuracy through lm-evaluation-harness (surgery.eval.tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError
from surgery.eval.tasks import TaskOptions


@dataclass(frozen=True)
class EvalOptions:
    """Windows of `seq_len` tokens every `stride` (None: seq_len), at most `max_tokens` per file, `batch_size`
    windows (tasks: requests) per forward pass; `device` auto/cpu/cuda[:N]/mps; `dtype` "auto" keeps the
    checkpoint's."""

    max_tokens: int = 16384
    seq_len: int = 512
    stride: int | None = None
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
                   revision: str | None = None, tasks: TaskOptions = TaskOptions()) -> dict:
    """Perplexity of MODEL (a folder or a Hub repo id) on each DATA file (folders: each file in them),
    with KL and top-1 agreement against `reference` when given, and the scores of `tasks` (under "tasks":
    the model's and the reference's runs). Bad data and unknown tasks are refused before any model loads;
    transformers' errors (OSError, ValueError: a folder it cannot load) are reported as bad input."""
    if not data and not tasks.specs:
        raise UserError("nothing to evaluate: give -d DATA (perplexity) and/or --tasks TASKS (accuracy)")
    if options.stride is not None and options.stride > options.seq_len:
        raise UserError(f"--stride {options.stride} is longer than --seq-len {options.seq_len}: tokens would be skipped")
    try:
        return _evaluate(model, data, options, reference, revision, tasks)
    except (OSError, ValueError) as e:
        raise UserError(str(e).replace("\n", " ")) from e  # transformers' messages can span lines


def _evaluate(model: str, data, options: EvalOptions, reference: str | None, revision: str | None,
              tasks: TaskOptions) -> dict:
    from surgery.eval.perplexity import evaluate
    from surgery.eval.tasks import resolve_tasks, task_cache
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
    with task_cache() as cache:
        task_list, manager = resolve_tasks(tasks.specs, cache) if tasks.specs else ([], None)
        device = resolve_device(options.device)
        dtype = None if options.dtype == "auto" else options.dtype
        tokenizer = load_tokenizer(model_dir)
        lm = load_model(model_dir, device, dtype)
        ref = load_model(ref_dir, device, dtype) if ref_dir else None
        result = evaluate(lm, tokenizer, files, seq_len=options.seq_len, max_tokens=options.max_tokens,
                          batch_size=options.batch_size, reference=ref, device=device,
                          stride=options.stride) if files else {}
        if task_list:
            runs = {"model": (lm, tokenizer)} | ({"reference": (ref, load_tokenizer(ref_dir))} if ref else {})
            result["tasks"] = _run_all(runs, task_list, manager, tasks, options.batch_size)
    return result


def _run_all(runs: dict, task_list: list, manager, tasks: TaskOptions, batch_size: int) -> dict:
    """The tasks on the model (and the reference): their scores, and how they were run."""
    from importlib.metadata import version

    from surgery.eval.tasks import run_tasks

    out = {"lm_eval_version": version("lm_eval"), "num_fewshot": tasks.num_fewshot, "limit": tasks.limit}
    for name, (model, tokenizer) in runs.items():
        out[name] = run_tasks(model, tokenizer, task_list, manager, tasks, batch_size=batch_size)
    return out
