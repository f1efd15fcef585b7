"""Calibration and evaluation text: reading documents and cutting them into token sequences.

Shared by the collector, the evaluator and the healer so that all three see text the same
way: documents tokenized without special tokens, EOS only between documents.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import UserError

SUFFIXES = (".jsonl", ".txt")
_TOKENIZE_CHUNK = 256  # documents per tokenizer call: batched for speed, bounded for memory


class DataError(UserError):
    """Bad input text: the message is one line naming the file and the problem."""


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a .jsonl file, a .txt file, or every such file under a folder (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no .jsonl or .txt files")
        return [doc for f in files for doc in read_documents(f)]
    if not p.is_file():
        raise DataError(f"{p}: no such file or folder")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{p}: unknown extension {p.suffix!r} (expected .jsonl, .txt or a folder)")
    text = _read_text(p)
    docs = _jsonl_documents(p, text) if p.suffix == ".jsonl" else _txt_documents(text)
    if not docs:
        raise DataError(f"{p}: no documents")
    return docs


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    if not data:
        raise DataError(f"{p}: empty file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None


def _jsonl_documents(p: Path, text: str) -> list[str]:
    """The non-empty `text` fields, one JSON object per line.

    Split on '\\n' only: str.splitlines would also break on U+2028, which JSON allows raw.
    """
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{p}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"{p}:{lineno}: not a JSON object")
        if "text" not in record:
            raise DataError(f"{p}:{lineno}: no \"text\" field")
        if not isinstance(record["text"], str):
            raise DataError(f"{p}:{lineno}: \"text\" is not a string")
        if record["text"]:
            docs.append(record["text"])
    return docs


def _txt_documents(text: str) -> list[str]:
    """Blocks of lines separated by blank (or whitespace-only) lines."""
    docs, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs


@dataclass
class CalibrationSet:
    """Token sequences for statistics collection, with what is needed to reproduce them."""

    input_ids: torch.Tensor  # int64 [num_sequences, seq_len]
    sources: list[str]
    seq_len: int
    seed: int
    num_tokens: int
    mode: str
    num_requested: int  # more than num_sequences when the text ran out

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def description(self) -> dict:
        """Metadata for the stats file: enough to rebuild the same sequences."""
        return {
            "sources": list(self.sources),
            "num_sequences": self.num_sequences,
            "num_requested": self.num_requested,
            "num_tokens": self.num_tokens,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "mode": self.mode,
        }


SAMPLING = ("packed", "documents")  # `collect --sampling`


def build_sequences(
    paths: list[str],
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int,
    mode: str = "packed",
) -> CalibrationSet:
    """Calibration sequences from the documents of all paths, shuffled together by `seed`.

    "packed": documents joined (EOS between) and cut into consecutive windows of seq_len.
    "documents": one window of seq_len per document of at least seq_len tokens (shorter ones are
    skipped), starting at a random offset drawn from `seed`: the sampler of SparseGPT and Wanda's C4
    loader, which MoE-Pruner and the other pruning papers calibrate with; no window spans two documents.
    When the text runs out, fewer sequences are returned, recorded in `num_requested` and
    warned about.
    """
    if mode not in SAMPLING:
        raise ValueError(f"unknown sampling {mode!r} (expected one of {', '.join(SAMPLING)})")
    if num_samples < 1 or seq_len < 1:
        raise DataError(f"need at least one sample of at least one token (got {num_samples} x {seq_len})")
    docs = [doc for path in paths for doc in read_documents(path)]
    random.Random(seed).shuffle(docs)
    where = ", ".join(str(p) for p in paths)
    if mode == "packed":
        rows = _packed_rows(docs, tokenizer, num_samples, seq_len, where)
    else:
        rows = _document_rows(docs, tokenizer, num_samples, seq_len, where, random.Random(seed + 1))
    if len(rows) < num_samples:
        warnings.warn(
            f"{where}: text ran out after {len(rows)} of {num_samples} sequences of {seq_len} tokens",
            stacklevel=2,
        )
    input_ids = torch.tensor(rows, dtype=torch.long)
    return CalibrationSet(
        input_ids=input_ids,
        sources=[str(p) for p in paths],
        seq_len=seq_len,
        seed=seed,
        num_tokens=input_ids.numel(),
        mode=mode,
        num_requested=num_samples,
    )


def _packed_rows(docs: list[str], tokenizer, num_samples: int, seq_len: int, where: str) -> list[list[int]]:
    tokens = _concatenate(docs, tokenizer, num_samples * seq_len)
    n = min(num_samples, len(tokens) // seq_len)
    if n == 0:
        raise DataError(
            f"{where}: only {len(tokens)} tokens, not enough for one sequence of {seq_len}; "
            "use a smaller --seq-len"
        )
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def _document_rows(docs: list[str], tokenizer, num_samples: int, seq_len: int, where: str,
                   rng: random.Random) -> list[list[int]]:
    rows, longest = [], 0
    for ids in _tokenize(docs, tokenizer):
        longest = max(longest, len(ids))
        if len(ids) >= seq_len:
            start = rng.randint(0, len(ids) - seq_len)
            rows.append(ids[start:start + seq_len])
            if len(rows) == num_samples:
                break
    if not rows:
        raise DataError(
            f"{where}: no document has {seq_len} tokens (longest: {longest}); "
            "use a smaller --seq-len or --sampling packed"
        )
    return rows


def _tokenize(docs: list[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenized lazily in batches."""
    for i in range(0, len(docs), _TOKENIZE_CHUNK):
        yield from tokenizer(docs[i : i + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]


def _concatenate(docs: list[str], tokenizer, limit: int) -> list[int]:
    """Documents' tokens in order with EOS (when the tokenizer has one) between them.

    Stops once `limit` tokens are gathered, so a large corpus is not tokenized whole.
    """
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for i, ids in enumerate(_tokenize(docs, tokenizer)):
        if i and eos is not None:
            tokens.append(eos)
        tokens.extend(ids)
        if len(tokens) >= limit:
            break
    return tokens


def cap_seq_len(config: dict, seq_len: int) -> int:
    """seq_len, lowered to the model's max_position_embeddings (top level or text_config)."""
    limit = config.get("max_position_embeddings")
    text_config = config.get("text_config")
    if limit is None and isinstance(text_config, dict):
        limit = text_config.get("max_position_embeddings")
    return min(seq_len, limit) if limit else seq_len


def eval_windows(path: str | os.PathLike, tokenizer, seq_len: int, max_tokens: int,
                 stride: int | None = None) -> torch.Tensor:
    """Windows of seq_len tokens over one file's documents in file order, at most max_tokens in all,
    starting every `stride` tokens (None: seq_len, non-overlapping windows).

    File order (no shuffle) keeps evaluation comparable between models and runs; a last window that
    would run past the tokens is dropped so every window has the same length.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"--stride {stride} must be between 1 and --seq-len {seq_len} (tokens would be skipped)")
    if max_tokens < seq_len:
        raise DataError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}")
    tokens = _concatenate(read_documents(path), tokenizer, max_tokens)
    total = min(len(tokens), max_tokens)
    if total < seq_len:
        raise DataError(
            f"{path}: only {len(tokens)} tokens, not enough for one window of {seq_len}; "
            "use a smaller --seq-len"
        )
    return torch.tensor(tokens[:total], dtype=torch.long).unfold(0, seq_len, stride).contiguous()
