"""Perplexity of a model on text files, and optionally its divergence from a reference model.

Used to judge a pruned checkpoint: perplexity per domain says how much quality was lost,
KL and top-1 agreement against the original say how far its predictions moved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery.errors import UserError
from surgery.model.data import cap_seq_len, eval_windows


@dataclass
class _Totals:
    """Sums over predicted positions of one file; float64 Python floats so long runs don't drift."""

    positions: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def evaluate(
    model,
    tokenizer,
    data_paths: list[str],
    seq_len: int = 512,
    max_tokens: int = 16384,
    batch_size: int = 8,
    reference=None,
    device: str = "cpu",
    progress: bool = True,
    stride: int | None = None,
) -> dict:
    """Perplexity per data file and their geometric mean; KL(reference || model) and top-1
    agreement per file and averaged over files when a reference model is given.

    Every file gets the same weight in the overall numbers, so a large domain does not drown
    out a small one. seq_len is capped at the model's max_position_embeddings. Windows start every
    `stride` tokens (None: seq_len, non-overlapping); with overlap, each token is scored once, in the
    first window that predicts it, so later windows give it up to seq_len - stride tokens of context.
    """
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise UserError(f"{reference.name_or_path}: the reference has a vocabulary of {reference.config.vocab_size} tokens, the model "
                        f"{model.config.vocab_size}: KL needs the same vocabulary (is it the model this one came from?)")
    seq_len = cap_seq_len(model.config.to_dict(), seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict anything (got {seq_len})")
    stride = seq_len if stride is None else min(stride, seq_len)
    windows = [(str(p), eval_windows(p, tokenizer, seq_len, max_tokens, stride)) for p in data_paths]
    files = []
    start = time.perf_counter()
    with torch.no_grad(), tqdm(
        total=sum(len(w) for _, w in windows), unit="seq", desc="eval", disable=not progress
    ) as bar:
        for path, w in windows:
            totals = _Totals()
            skips = _skips(len(w), seq_len, stride)
            for batch, skip in zip(w.split(batch_size), skips.split(batch_size)):
                _score_batch(model, reference, batch.to(device), totals, skip.tolist())
                bar.update(len(batch))
            files.append(_file_result(path, seq_len + (len(w) - 1) * stride, len(w), totals, reference is not None))
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    result = _summary(files, seq_len, reference is not None)
    result["stride"] = stride
    result["timing"] = _timing(model, reference, sum(w.numel() for _, w in windows), time.perf_counter() - start)
    return result


def _timing(model, reference, tokens: int, seconds: float) -> dict:
    """Load time (as `surgery.model.load_model` recorded it on the models; 0 when they were built
    otherwise) and compute throughput over every token scored (each goes through both models when
    there is a reference), timed after loading."""
    load = sum(float(getattr(m, "moe_surgery_load_seconds", 0.0)) for m in (model, reference) if m is not None)
    return {"load_seconds": round(load, 6), "compute_seconds": round(seconds, 6), "tokens_processed": tokens,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0}


def _skips(windows: int, seq_len: int, stride: int) -> torch.Tensor:
    """Per window, the predictions left out because an earlier window scored their tokens: none in the
    first window, and with overlapping windows all but the last `stride` in the others."""
    skips = torch.full((windows,), max(0, seq_len - stride - 1), dtype=torch.long)
    skips[:1] = 0
    return skips


def _score_batch(model, reference, input_ids: torch.Tensor, totals: _Totals, skips: list[int]) -> None:
    """Add one batch's next-token NLL (and KL, agreement) to totals, from prediction skips[i] on in row i.

    Logits go to float32 one row at a time: a whole batch at a 150k vocabulary would
    need gigabytes.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    ref_logits = None
    if reference is not None:
        ref_logits = reference(input_ids=input_ids, use_cache=False).logits[:, :-1]
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"reference vocabulary ({ref_logits.shape[-1]}) differs from the model's ({logits.shape[-1]})"
            )
    targets = input_ids[:, 1:]
    for i, skip in enumerate(skips):
        row, target = logits[i, skip:].float(), targets[i, skip:]
        totals.positions += len(target)
        totals.nll += F.cross_entropy(row, target, reduction="sum").item()
        if ref_logits is not None:
            ref_row = ref_logits[i, skip:].float()
            totals.kl += F.kl_div(
                F.log_softmax(row, -1), F.log_softmax(ref_row, -1), reduction="sum", log_target=True
            ).item()
            totals.agree += (row.argmax(-1) == ref_row.argmax(-1)).sum().item()


def _ppl(nll: float) -> float:
    """exp(nll), infinite rather than an OverflowError for a badly broken model."""
    return math.exp(nll) if nll < 709.0 else math.inf


def _file_result(path: str, tokens: int, windows: int, totals: _Totals, with_reference: bool) -> dict:
    nll = totals.nll / totals.positions
    result = {
        "file": path,
        "domain": Path(path).stem,
        "windows": windows,
        "tokens": tokens,
        "nll": nll,
        "ppl": _ppl(nll),
    }
    if with_reference:
        result["kl"] = totals.kl / totals.positions
        result["top1"] = totals.agree / totals.positions
    return result


def _summary(files: list[dict], seq_len: int, with_reference: bool) -> dict:
    result = {
        "files": files,
        "seq_len": seq_len,
        "geomean_ppl": _ppl(sum(f["nll"] for f in files) / len(files)),
    }
    if with_reference:
        result["kl"] = sum(f["kl"] for f in files) / len(files)
        result["top1"] = sum(f["top1"] for f in files) / len(files)
    return result


def format_report(result: dict) -> str:
    """A plain-text table, one row per file, then the overall numbers."""
    with_reference = "kl" in result
    header = ["file", "tokens", "ppl"] + (["kl", "top1"] if with_reference else [])
    rows = []
    for f in result["files"]:
        row = [f["file"], str(f["tokens"]), f"{f['ppl']:.4g}"]
        if with_reference:
            row += [f"{f['kl']:.4g}", f"{f['top1']:.4f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    summary = f"geometric mean ppl: {result['geomean_ppl']:.4g}"
    if with_reference:
        summary += f"   mean kl: {result['kl']:.4g}   mean top1: {result['top1']:.4f}"
    out = [*lines, summary]
    if "timing" in result:
        t = result["timing"]
        out.append(f"loaded in {t['load_seconds']:.1f} s; scored {t['tokens_processed']} tokens in "
                   f"{t['compute_seconds']:.1f} s ({t['tokens_per_second']:.0f} tokens/s)")
    return "\n".join(out)
