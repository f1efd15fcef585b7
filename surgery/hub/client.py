"""Hugging Face Hub in and out: repo ids as model arguments, and pushing a pruned checkpoint.

Downloads go through `snapshot_download` into the normal HF cache, so `HF_TOKEN`,
`HF_HUB_OFFLINE`, `HF_HUB_CACHE` and already cached files behave as in every HF tool. Every
Hub failure becomes a one-line `HubError`; nothing here deletes or rewrites a local folder.

huggingface_hub and its HTTP stack (about 0.2 s to import) are imported on first use by `_import_hub`,
so a local MODEL never pays for them: `is_repo_id` and the local branch of `resolve_model` are plain
Python. Its names (`snapshot_download`, `HfApi`, ...) are still attributes of this module, loaded on
first access, so tests can replace them.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from surgery import __version__
from surgery.errors import UserError
from surgery.io import INDEX_NAME, SINGLE_NAME

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi

# `org/name` with an optional `@revision` (branch, tag, commit or refs/pr/N); Hub names use [\w.-].
_REPO_RE = re.compile(r"^(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<rev>\w[\w./-]*))?$")

# What transformers needs besides config and weights to run the model.
RUNTIME_FILES = [
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
    "merges.txt", "*.tiktoken", "chat_template*", "*.jinja", "*.py",
]
# Prune also fetches the card and licence files: the rewriter copies them into its output.
CARD_FILES = ["README.md", "LICENSE*", "NOTICE*", "USE_POLICY*"]
SIDE_FILES = {"prune": RUNTIME_FILES + CARD_FILES, "collect": RUNTIME_FILES, "eval": RUNTIME_FILES}

STATS_DIR_IN_REPO = "moe_surgery"


class HubError(UserError):
    """A Hub download or upload failed; the message is one line and says what to do."""


_HUB_NAMES = ("CommitOperationAdd", "HfApi", "get_token", "is_offline_mode", "snapshot_download", "hf_errors",
              "TransportError")


def _import_hub() -> None:
    """Bind the huggingface_hub names this module uses as its globals, once; a name already set (a test's
    replacement) is kept."""
    if all(name in globals() for name in _HUB_NAMES):
        return
    from huggingface_hub import CommitOperationAdd, HfApi, get_token, is_offline_mode, snapshot_download
    from huggingface_hub import errors as hf_errors

    try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        from httpx import TransportError
    found = locals()
    for name in _HUB_NAMES:
        globals().setdefault(name, found[name])


def __getattr__(name: str) -> Any:
    """`surgery.hub.client.snapshot_download` and the other huggingface_hub names, imported on first access."""
    if name in _HUB_NAMES:
        _import_hub()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_repo_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `model` is spelled like a Hub repo id, else None."""
    m = _REPO_RE.match(model)
    return (m["repo"], m["rev"]) if m else None


def is_repo_id(model: str) -> bool:
    """True for `org/name[@rev]` strings that are not an existing local path (a local folder wins)."""
    return not Path(model).exists() and parse_repo_id(model) is not None


def resolve_model(model: str, *, revision: str | None = None, purpose: str) -> Path:
    """A local checkpoint folder for MODEL: the folder itself, or a Hub repo downloaded into the HF cache.

    `purpose` ("prune", "collect" or "eval") picks the side files. Weights are limited to the
    shards the index names (or `model.safetensors`), so other weight sets in the repo
    (`consolidated.safetensors`, `*.bin`, `original/`) are never fetched.
    """
    if not is_repo_id(model):
        if revision is not None:
            raise HubError(f"{model}: --revision applies to Hub repo ids, not to local folders")
        return Path(model)
    repo_id, rev = _pick_revision(model, revision)
    _import_hub()
    with _hub_errors(repo_id, rev):
        first = Path(snapshot_download(repo_id, revision=rev, allow_patterns=["config.json", INDEX_NAME]))
        if not (first / "config.json").is_file():
            raise HubError(f"{repo_id}: no config.json in the repository; not a transformers checkpoint")
        patterns = ["config.json", INDEX_NAME, *_weight_files(first), *SIDE_FILES[purpose]]
        # The snapshot folder is named by commit: pinning it keeps both calls on one revision.
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
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise HubError(f"{index}: corrupt index (no weight_map object)") from None


def check_can_push(repo_id: str) -> None:
    """Fail before any work when a push cannot succeed: bad repo id, no token, offline mode."""
    parsed = parse_repo_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise HubError(f"{repo_id}: give the target repository as org/name (a branch goes to --revision)")
    _import_hub()
    if is_offline_mode():
        raise HubError(f"{repo_id}: HF_HUB_OFFLINE is set; unset it to push")
    if get_token() is None:
        raise HubError(f"{repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_stats: str | Path | None = None,
    card: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a verified checkpoint folder to `repo_id` in one commit; returns the commit URL.

    `create_commit` uploads every file's content first and only then writes one commit, so a
    failed push leaves the repository as it was (Xet deduplication makes a re-run skip what was
    already sent). This is the large-folder path too: huggingface_hub 2.x has no
    `upload_large_folder`, and its `upload_folder` splits big folders into several commits.
    One commit takes up to 25k LFS files, far more than any checkpoint's shards. `card` replaces the
    content of the README.md uploaded (`surgery.hub.model_card.card_for_push`); the local one is left as it is.
    """
    folder = Path(folder)
    check_can_push(repo_id)
    _check_pushable(folder)
    operations = _operations(folder, Path(include_stats) if include_stats else None)
    if card is not None:
        operations = [op for op in operations if op.path_in_repo != "README.md"] + [
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]
    api = api or HfApi()
    message = commit_message or f"Upload pruned checkpoint (moe-surgery {__version__})"
    with _hub_errors(repo_id, revision):
        # private=None keeps the namespace's default visibility (some organisations force private).
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return str(info.commit_url)


def _check_pushable(folder: Path) -> None:
    """Refuse to upload a folder that `verify` would reject."""
    from surgery.hub.verify import verify_checkpoint

    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder")
    problems = verify_checkpoint(folder)
    if problems:
        raise HubError(f"{folder}: not pushed, the checkpoint is inconsistent: {problems[0]}")


def _operations(folder: Path, stats: Path | None) -> list[CommitOperationAdd]:
    """Every file of the folder (hidden files and folders skipped), plus the statistics file if asked."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    if stats is not None:
        from stats_formats import StatsFile

        StatsFile(stats)  # a wrong or corrupt file fails here, before anything is uploaded
        ops.append(CommitOperationAdd(path_in_repo=f"{STATS_DIR_IN_REPO}/{stats.name}", path_or_fileobj=str(stats)))
    return ops


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line HubErrors naming the repo."""
    _import_hub()
    try:
        yield
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.LocalTokenNotFoundError,
            TransportError, ConnectionError, TimeoutError) as e:
        raise HubError(f"{repo_id}: {_describe(e, repo_id, revision)}") from None


def _describe(e: Exception, repo_id: str, revision: str | None) -> str:
    """What went wrong and what to do, most specific exception first."""
    if isinstance(e, hf_errors.GatedRepoError):
        return f"gated repository; accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN"
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return "repository not found on the Hugging Face Hub, or not visible to this token (set HF_TOKEN)"
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return f"revision {revision!r} not found"
    if isinstance(e, hf_errors.LocalTokenNotFoundError):
        return "no Hugging Face token; set HF_TOKEN or run `hf auth login`"
    if isinstance(e, hf_errors.LocalEntryNotFoundError):
        if is_offline_mode():
            return "not (completely) in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        return "cannot reach the Hugging Face Hub and the files are not cached; check the network"
    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to reach the Hub"
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = e.response.status_code
        if status == 401:
            return "unauthorised (HTTP 401): HF_TOKEN is missing, invalid or expired"
        if status == 403:
            namespace = repo_id.split("/")[0]
            return f"forbidden (HTTP 403): the token lacks permission (a push needs write access to {namespace})"
        return f"Hugging Face Hub error (HTTP {status}): {_first_line(e)}"
    return f"cannot reach the Hugging Face Hub ({type(e).__name__}: {_first_line(e)}); check the network"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
