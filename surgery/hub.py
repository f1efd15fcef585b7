"""Hugging Face Hub in and out: repo ids as model arguments, and pushing a pruned checkpoint.

Downloads go through `snapshot_download` into the normal HF cache, so `HF_TOKEN`,
`HF_HUB_OFFLINE`, `HF_HUB_CACHE` and already cached files work as everywhere else. Every Hub
failure becomes a one-line `HubError`; nothing here ever touches a local output folder.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_token, is_offline_mode, snapshot_download
from huggingface_hub import errors as hf_errors

from . import __version__
from .errors import UserError
from .io import INDEX_NAME, SINGLE_NAME

# `org/name` with an optional `@revision` (branch, tag, commit or refs/pr/N); Hub names use [\w.-].
_REPO_RE = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?:@(?P<rev>[\w][\w./-]*))?$")

# What transformers needs besides config and weights to run the model.
RUNTIME_FILES = [
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
    "merges.txt", "*.tiktoken", "chat_template*", "*.jinja", "*.py",
]
# Prune also carries the card and licence files into its output (the rewriter copies them).
CARD_FILES = ["README.md", "LICENSE*", "NOTICE*", "USE_POLICY*"]
SIDE_FILES = {"prune": RUNTIME_FILES + CARD_FILES, "collect": RUNTIME_FILES, "eval": RUNTIME_FILES}

STATS_DIR_IN_REPO = "moe_surgery"


class HubError(UserError):
    """A Hub download or upload failed; the message is one line and says what to do."""


def parse_repo_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `model` is written like a Hub repo id, else None."""
    m = _REPO_RE.match(model)
    return (m["repo"], m["rev"]) if m else None


def is_repo_id(model: str) -> bool:
    """True for `org/name[@rev]` strings that are not an existing local path (a local folder wins)."""
    return not Path(model).exists() and parse_repo_id(model) is not None


def resolve_model(model: str, *, revision: str | None = None, purpose: str) -> Path:
    """A local checkpoint folder for MODEL: the folder itself, or a Hub repo downloaded into the HF cache.

    `purpose` ("prune", "collect", "eval") picks the side files. Weights are limited to the
    shards named by the index (or `model.safetensors`), so duplicate weight sets in the repo
    (`consolidated.safetensors`, `*.bin`, `original/`) are never fetched.
    """
    if not is_repo_id(model):
        if revision is not None:
            raise HubError(f"{model}: --revision applies to Hub repo ids, not to local folders")
        return Path(model)
    repo_id, rev = _pick_revision(model, revision)
    with hub_errors(repo_id, rev):
        first = Path(snapshot_download(repo_id, revision=rev, allow_patterns=["config.json", INDEX_NAME]))
        if not (first / "config.json").is_file():
            raise HubError(f"{repo_id}: no config.json in the repository; not a transformers checkpoint")
        # Pin the commit the first call resolved, so a push to the branch in between cannot mix revisions.
        patterns = ["config.json", INDEX_NAME, *_weight_files(first), *SIDE_FILES[purpose]]
        return Path(snapshot_download(repo_id, revision=first.name, allow_patterns=patterns))


def _pick_revision(model: str, revision: str | None) -> tuple[str, str | None]:
    repo_id, rev = parse_repo_id(model)
    if rev is not None and revision is not None and rev != revision:
        raise HubError(f"{model}: revision given twice ({rev!r} in the id, {revision!r} by --revision)")
    return repo_id, rev or revision


def _weight_files(snapshot: Path) -> list[str]:
    """The shard names the index lists, or the single-file checkpoint name."""
    index = snapshot / INDEX_NAME
    if not index.is_file():
        return [SINGLE_NAME]
    from .io import Checkpoint  # noqa: F401 - same index rules as the reader

    import json

    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise HubError(f"{index}: corrupt index (no weight_map object)") from None
