"""Hub in and out without a network: a fake `snapshot_download` serving local "remote" folders into a
folder laid out like the HF cache, a fake HfApi recording what would be created and committed, and
the model card's YAML and kept-if-edited rules."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import httpx2
import pytest
import yaml
from click.testing import Result
from huggingface_hub import ModelCard, constants
from huggingface_hub import snapshot_download as real_snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import filter_repo_objects

import surgery.hub.client as hub
from stats_factory import default_calibration, default_model, make_stats
from stats_formats import StatsFile
from stats_formats.file import StatsError
from surgery.hub.client import HubError, is_repo_id, push_folder, resolve_model
from surgery.hub.model_card import checkpoint_numbers, keep_user_card, update_card_eval, write_model_card
from surgery.plan import Plan
from surgery.rewrite.experts import rewrite_checkpoint
from tiny_models import INDEX_NAME, checkpoint_bytes, folder_digest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "org/tiny"
KEEP = {0: [0, 2, 3, 5, 6, 7], 2: [1, 2, 3, 4, 5, 6]}  # qwen3_moe tiny: MoE layers 0 and 2, 8 experts
PLAN_DOC = {"keep": {str(k): v for k, v in KEEP.items()}, "criterion": "reap", "ratio": 0.25, "stats_sha256": "a" * 64}
COMMAND = "moe-surgery prune org/tiny --stats s.safetensors --criterion reap --ratio 0.25 -o out"
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\nbase_model: grandparent/model\n---\n\n# Tiny\n"
EVAL = {"files": [{"file": "data/wiki.txt", "domain": "wiki", "windows": 2, "tokens": 1024, "nll": 2.0, "ppl": 7.389}],
        "seq_len": 512, "geomean_ppl": 7.389}
EVAL_REF = {"files": [{"file": "data/code.txt", "domain": "code", "windows": 1, "tokens": 512, "nll": 1.0, "ppl": 2.718,
                       "kl": 0.0123, "top1": 0.9}], "seq_len": 256, "geomean_ppl": 2.718, "kl": 0.0123, "top1": 0.9}


def http_error(cls: type, status: int) -> Exception:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/tiny")
    return cls(f"{status} Client Error.\nmore detail", response=httpx2.Response(status, request=request))


class FakeSnapshots:
    """`snapshot_download` over local folders, written like the HF cache (blobs + snapshot symlinks)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.repos: dict[str, tuple[Path, dict[str, str]]] = {}
        self.calls: list[dict] = []
        self.error: Exception | None = None

    def add(self, repo_id: str, folder: Path, refs: dict[str, str] | None = None) -> None:
        self.repos[repo_id] = (folder, refs or {"main": COMMIT})

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                 **kwargs) -> str:
        self.calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns or []),
                           **kwargs})
        if self.error is not None:
            raise self.error
        if repo_id not in self.repos:
            raise http_error(hf_errors.RepositoryNotFoundError, 404)
        folder, refs = self.repos[repo_id]
        revision = revision or "main"
        commit = refs.get(revision, revision)
        if commit not in refs.values():
            raise http_error(hf_errors.RevisionNotFoundError, 404)
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / commit
        if revision != commit:
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            (storage / "refs" / revision).write_text(commit)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            data = (folder / rel).read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(blob)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def downloaded(self, repo_id: str = REPO, commit: str = COMMIT) -> set[str]:
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
        return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


class FakeHubApi:
    """Records repo creation, branches and commits; `fail` = (method name, exception) to raise there."""

    def __init__(self, fail: tuple[str, Exception] | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.fail = fail

    def _record(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))
        if self.fail and self.fail[0] == name:
            raise self.fail[1]

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self._record("create_repo", repo_id=repo_id, **kwargs)

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self._record("create_branch", repo_id=repo_id, **kwargs)

    def create_commit(self, repo_id: str, operations, **kwargs) -> SimpleNamespace:
        ops = list(operations)
        self._record("create_commit", repo_id=repo_id, **kwargs)
        self.commits.append({
            "repo_id": repo_id,
            "files": {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in ops},
            **kwargs,
        })
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'f' * 40}")


@pytest.fixture(autouse=True)
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real token, no offline mode, no stored login: each test sets what it needs."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture
def remote(tiny: Callable[[str, str], Path], tmp_path: Path) -> Path:
    """A repo's files: the tiny checkpoint plus a card, side files, and weight sets prune must not fetch."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny("qwen3_moe", "per-expert"), folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    (folder / "LICENSE").write_text("Apache License 2.0\n")
    (folder / "tokenizer.json").write_text("{}\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}\n")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (folder / "model.gguf").write_bytes(b"\0" * 64)
    shutil.copy(next(folder.glob("model-*.safetensors")), folder / "consolidated.safetensors")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}\n")
    return folder


@pytest.fixture
def fake_hub(remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSnapshots:
    fake = FakeSnapshots(tmp_path / "hf-cache" / "hub")
    fake.add(REPO, remote, {"main": COMMIT, "v2": TAG_COMMIT})
    monkeypatch.setattr(hub, "snapshot_download", fake)
    return fake


def shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))


def prune_from_hub(out: Path, **kwargs) -> tuple[Path, dict]:
    """MODEL given as a repo id, then the rewrite `prune` runs; returns (source snapshot, provenance)."""
    src = resolve_model(REPO, purpose="prune")
    rewrite_checkpoint(src, Plan.from_json(PLAN_DOC, "reap plan"), out, **kwargs)
    return src, json.loads((out / "pruning.json").read_text())


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


# --- repo ids and downloads ---------------------------------------------------------------------


def test_is_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    for s in ["org/name", "Qwen/Qwen3-30B-A3B", "org/name@v1.0", "org/name@refs/pr/3", f"org/name@{COMMIT}"]:
        assert is_repo_id(s), s
    for s in ["local/model", "name", "/abs/path", "./org/name", "a/b/c", "org/", "org/name@", "~/org/name"]:
        assert not is_repo_id(s), s


def test_local_folder_is_used_as_is(tiny: Callable[[str, str], Path], fake_hub: FakeSnapshots) -> None:
    folder = tiny("qwen3_moe", "per-expert")
    assert resolve_model(str(folder), purpose="prune") == folder
    assert fake_hub.calls == []
    with pytest.raises(HubError, match="--revision applies to Hub repo ids") as e:
        resolve_model(str(folder), revision="main", purpose="prune")
    one_line(e)


def test_prune_downloads_only_config_index_shards_and_side_files(fake_hub: FakeSnapshots, remote: Path) -> None:
    path = resolve_model(REPO, purpose="prune")
    assert path == fake_hub.cache / "models--org--tiny" / "snapshots" / COMMIT
    first, second = fake_hub.calls
    assert first["allow_patterns"] == ["config.json", INDEX_NAME]
    assert first["revision"] is None
    assert second["revision"] == COMMIT, "the second call must stay on the commit the first one resolved"
    assert not [p for p in second["allow_patterns"] if "*" in p and ("safetensors" in p or "bin" in p)]
    expected = {"config.json", INDEX_NAME, *shards(remote), "generation_config.json", "tokenizer_config.json",
                "tokenizer.json", "chat_template.jinja", "README.md", "LICENSE"}
    assert fake_hub.downloaded() == expected


def test_collect_and_eval_skip_card_files(fake_hub: FakeSnapshots, remote: Path) -> None:
    for purpose in ("collect", "eval"):
        resolve_model(REPO, purpose=purpose)
    assert fake_hub.downloaded() == {"config.json", INDEX_NAME, *shards(remote), "generation_config.json",
                                     "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"}


def test_single_file_repo_fetches_model_safetensors(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}\n")
    (single / "model.safetensors").write_bytes(b"\0" * 16)
    (single / "other.safetensors").write_bytes(b"\0" * 16)
    fake_hub.add("org/single", single)
    resolve_model("org/single", purpose="prune")
    assert "model.safetensors" in fake_hub.calls[-1]["allow_patterns"]
    assert fake_hub.downloaded("org/single") == {"config.json", "model.safetensors"}


def test_revision_from_id_or_option(fake_hub: FakeSnapshots) -> None:
    assert resolve_model(f"{REPO}@v2", purpose="eval").name == TAG_COMMIT
    assert [c["revision"] for c in fake_hub.calls] == ["v2", TAG_COMMIT]
    assert resolve_model(REPO, revision="v2", purpose="eval").name == TAG_COMMIT
    with pytest.raises(HubError, match="revision given twice") as e:
        resolve_model(f"{REPO}@v2", revision="main", purpose="eval")
    one_line(e)


def test_missing_config_is_refused(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"\0" * 16)
    fake_hub.add("org/noconfig", tmp_path / "noconfig")
    with pytest.raises(HubError, match="no config.json") as e:
        resolve_model("org/noconfig", purpose="prune")
    one_line(e)


@pytest.mark.parametrize("error, offline, expected", [
    (lambda: http_error(hf_errors.RepositoryNotFoundError, 404), False, "not found on the Hugging Face Hub.*HF_TOKEN"),
    (lambda: http_error(hf_errors.GatedRepoError, 403), False, "gated repository"),
    (lambda: http_error(hf_errors.RevisionNotFoundError, 404), False, "revision"),
    (lambda: http_error(hf_errors.HfHubHTTPError, 401), False, "unauthorised"),
    (lambda: http_error(hf_errors.HfHubHTTPError, 500), False, r"HTTP 500\): 500 Client Error\.$"),
    (lambda: hf_errors.LocalEntryNotFoundError("not cached\nsecond line"), True, "HF_HUB_OFFLINE is set"),
    (lambda: hf_errors.LocalEntryNotFoundError("not cached\nsecond line"), False, "check the network"),
    (lambda: httpx2.ConnectError("connection refused"), False, "cannot reach the Hugging Face Hub"),
])
def test_download_errors_are_one_line(fake_hub: FakeSnapshots, monkeypatch: pytest.MonkeyPatch, error: Callable,
                                      offline: bool, expected: str) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    fake_hub.error = error()
    with pytest.raises(HubError, match=expected) as e:
        resolve_model(REPO, purpose="prune")
    assert one_line(e).startswith(f"{REPO}: ")


def test_cached_repo_resolves_offline_with_the_real_client(fake_hub: FakeSnapshots, remote: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub itself, with HF_HUB_OFFLINE set, finds the files in a cache laid out like ours."""
    online = resolve_model(REPO, purpose="prune")
    monkeypatch.setattr(hub, "snapshot_download", real_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model(REPO, purpose="prune") == online
    rewrite_checkpoint(online, Plan(KEEP), fake_hub.cache.parent / "out", hash_shards=False)
    with pytest.raises(HubError, match="org/other: .*HF_HUB_OFFLINE is set") as e:
        resolve_model("org/other", purpose="prune")
    one_line(e)


def test_unknown_repo(fake_hub: FakeSnapshots) -> None:
    with pytest.raises(HubError, match="org/missing: repository not found") as e:
        resolve_model("org/missing", purpose="collect")
    one_line(e)


# --- model card ---------------------------------------------------------------------------------


def test_card_metadata_and_body(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    out = tmp_path / "out"
    src, prov = prune_from_hub(out)
    assert (out / "README.md").read_text() == SOURCE_CARD, "the rewriter copies the source card"
    calibration = default_calibration(num_tokens=65536, holdout_sequences=4, sources=["data/wiki.jsonl"])
    assert write_model_card(out, REPO, prov, command=COMMAND, calibration=calibration)
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == REPO
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"moe", "expert-pruning"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert "base_model_relation" not in meta, "the Hub defines no relation for pruning"
    assert ModelCard.load(out / "README.md").data.base_model == REPO
    before, after = checkpoint_numbers(src), checkpoint_numbers(out)
    for needle in ["`reap`", "Ratio: 0.25", "| Routed experts per MoE layer | 8 | 6 |", f"commit `{COMMIT[:12]}`",
                   f"{before.total_params:,}", f"{after.total_params:,}", f"{before.active_params:,}",
                   f"{after.active_params:,}", "Disk size", "`data/wiki.jsonl`", "65,536 tokens", COMMAND,
                   "4 more sequences held out", "a" * 64]:
        assert needle in text, needle
    assert "## Evaluation" not in text


def test_card_counts_match_the_tensors(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    """Total = all elements; active = non-expert elements + top-2 experts' elements per MoE layer."""
    out = tmp_path / "out"
    src, _ = prune_from_hub(out)
    for folder, experts in [(src, 8), (out, 6)]:
        tensors = checkpoint_bytes(folder)
        numel = {n: math.prod(shape) for n, (_, shape, _) in tensors.items()}
        expert = {n: v for n, v in numel.items() if ".mlp.experts." in n}
        total = sum(numel.values())
        active = total - sum(expert.values()) + 2 * sum(expert.values()) // experts
        numbers = checkpoint_numbers(folder)
        assert (numbers.total_params, numbers.active_params) == (total, active)
        assert numbers.experts == {0: experts, 2: experts} and numbers.top_k == 2
        assert numbers.disk_bytes == sum((folder / s).stat().st_size for s in shards(folder))
    removed_router_rows = 2 * 2 * 32  # 2 MoE layers x 2 experts x hidden 32: all that active loses
    assert checkpoint_numbers(src).active_params - checkpoint_numbers(out).active_params == removed_router_rows


def test_card_from_local_folder_has_no_base_model(tiny: Callable[[str, str], Path], tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "per-expert")
    out = rewrite_checkpoint(src, Plan(KEEP), tmp_path / "out", hash_shards=False)
    prov = json.loads((out / "pruning.json").read_text())
    assert write_model_card(out, str(src), prov, command="moe-surgery prune ...")
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert "base_model" not in meta and "license" not in meta
    assert {"library_name", "pipeline_tag", "tags"} <= set(meta)
    assert "not a Hub repository" in text and "hand-made plan" in text
    assert "None: the plan did not use activation statistics." in text


def test_card_from_hf_cache_path_finds_the_repo(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    """MODEL given as the cache snapshot path still yields base_model and the commit."""
    out = tmp_path / "out"
    src, prov = prune_from_hub(out)
    write_model_card(out, str(src), prov, command=COMMAND)
    assert front_matter((out / "README.md").read_text())["base_model"] == REPO


def test_eval_results_go_into_our_card(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, prov = prune_from_hub(out)
    write_model_card(out, REPO, prov, command=COMMAND, eval_result=EVAL)
    assert "| wiki | 1,024 | 7.389 |" in (out / "README.md").read_text()
    assert update_card_eval(out, EVAL_REF)
    text = (out / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "wiki" not in text
    assert "| code | 512 | 2.718 | 0.0123 | 0.9000 |" in text
    assert "| **Geometric mean** |  | 2.718 | 0.0123 | 0.9000 |" in text
    assert front_matter(text)["base_model"] == REPO
    assert update_card_eval(out, EVAL), "a card updated by us is still ours"
    assert write_model_card(out, REPO, prov, command=COMMAND), "and may be regenerated"


def test_user_edited_card_is_kept(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, prov = prune_from_hub(out)
    write_model_card(out, REPO, prov, command=COMMAND)
    readme = out / "README.md"
    edited = readme.read_text().replace("# out", "# My pruned model")
    readme.write_text(edited)
    assert not write_model_card(out, REPO, prov, command=COMMAND)
    assert not update_card_eval(out, EVAL)
    assert readme.read_text() == edited


def test_user_card_survives_prune_overwrite(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    out = tmp_path / "out"
    src, _ = prune_from_hub(out)
    (out / "README.md").write_text("# Hand-written card\n")
    with keep_user_card(out, src):
        rewrite_checkpoint(src, Plan(KEEP), out, overwrite=True, hash_shards=False)
    assert (out / "README.md").read_text() == "# Hand-written card\n"
    prov = json.loads((out / "pruning.json").read_text())
    assert not write_model_card(out, REPO, prov, command=COMMAND)


def test_copied_source_card_is_not_kept_across_overwrite(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    out = tmp_path / "out"
    src, prov = prune_from_hub(out)
    with keep_user_card(out, src):
        rewrite_checkpoint(src, Plan(KEEP), out, overwrite=True, hash_shards=False)
    assert write_model_card(out, REPO, prov, command=COMMAND)


# --- push ---------------------------------------------------------------------------------------


@pytest.fixture
def pruned(fake_hub: FakeSnapshots, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    _, prov = prune_from_hub(out)
    write_model_card(out, REPO, prov, command=COMMAND)
    return out


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    model = default_model()
    path = tmp_path / "calib.safetensors"
    StatsFile.from_arrays(model, default_calibration(), make_stats(model, 16, 0)).save(path)
    return path


def local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_push_creates_repo_and_commits_once(pruned: Path, stats_file: Path, token: None) -> None:
    api = FakeHubApi()
    url = push_folder(pruned, "me/pruned", private=True, revision="exp", commit_message="first",
                      include_stats=stats_file, api=api)
    assert url == f"https://huggingface.co/me/pruned/commit/{'f' * 40}"
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/pruned", "private": True, "exist_ok": True}
    assert api.calls[1][1] == {"repo_id": "me/pruned", "branch": "exp", "exist_ok": True}
    (commit,) = api.commits
    assert commit["revision"] == "exp" and commit["commit_message"] == "first"
    assert set(commit["files"]) == local_files(pruned) | {"moe_surgery/calib.safetensors"}
    assert commit["files"]["README.md"] == (pruned / "README.md").read_bytes()
    assert "pruning.json" in commit["files"] and "config.json" in commit["files"]


def test_push_cli_defaults(pruned: Path, token: None, monkeypatch: pytest.MonkeyPatch,
                           cli: Callable[..., Result]) -> None:
    api = FakeHubApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    (pruned / ".cache").mkdir()
    (pruned / ".cache" / "lock").write_text("")
    result = cli("push", pruned, "me/pruned")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "https://huggingface.co/me/pruned/commit/" in result.output
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["private"] is None, "without --private the namespace default applies"
    assert api.commits[0]["revision"] is None
    assert not any(path.startswith(".") for path in api.commits[0]["files"])


def push_fails(cli: Callable[..., Result], folder: Path, *args: str) -> str:
    """Run `push`, expecting one `Error:` line, exit 2, and an untouched folder."""
    before = folder_digest(folder)
    result = cli("push", folder, *args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert folder_digest(folder) == before
    return lines[0]


def test_push_without_token_calls_nothing(pruned: Path, cli: Callable[..., Result],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeHubApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    assert "no Hugging Face token; set HF_TOKEN" in push_fails(cli, pruned, "me/pruned")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in push_fails(cli, pruned, "me/pruned")
    assert "give the target repository as org/name" in push_fails(cli, pruned, "me/pruned@dev")
    assert api.calls == []


@pytest.mark.parametrize("step, error, expected", [
    ("create_repo", lambda: http_error(hf_errors.HfHubHTTPError, 401), "unauthorised"),
    ("create_repo", lambda: httpx2.ConnectError("network is down"), "cannot reach the Hugging Face Hub"),
    ("create_commit", lambda: http_error(hf_errors.HfHubHTTPError, 403), "needs write access to me)"),
    ("create_commit", lambda: httpx2.ReadTimeout("timed out"), "cannot reach the Hugging Face Hub"),
])
def test_push_failures_are_one_line_and_commit_nothing(pruned: Path, token: None, cli: Callable[..., Result],
                                                       monkeypatch: pytest.MonkeyPatch, step: str,
                                                       error: Callable, expected: str) -> None:
    api = FakeHubApi(fail=(step, error()))
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    line = push_fails(cli, pruned, "me/pruned")
    assert line.startswith("Error: me/pruned: ") and expected in line, line
    assert api.commits == []


def test_inconsistent_checkpoint_is_not_pushed(pruned: Path, token: None) -> None:
    index = json.loads((pruned / INDEX_NAME).read_text())
    index["metadata"]["total_size"] += 1
    (pruned / INDEX_NAME).write_text(json.dumps(index))
    api = FakeHubApi()
    with pytest.raises(HubError, match="not pushed, the checkpoint is inconsistent: .*total_size") as e:
        push_folder(pruned, "me/pruned", api=api)
    one_line(e)
    assert api.calls == []


def test_bad_stats_file_is_refused_before_upload(pruned: Path, token: None, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a statistics file")
    api = FakeHubApi()
    with pytest.raises(StatsError):
        push_folder(pruned, "me/pruned", include_stats=bogus, api=api)
    assert api.calls == []


def test_task_results_add_to_the_cards_perplexity_and_back(fake_hub: FakeSnapshots, tmp_path: Path) -> None:
    """An `eval --tasks` result written into a card that shows perplexity keeps the perplexity table (and the
    other way round); a result of the same kind replaces the earlier one."""
    out = tmp_path / "out"
    _, prov = prune_from_hub(out)
    write_model_card(out, REPO, prov, command=COMMAND, eval_result=EVAL)
    tasks = {"model": {"results": {"arc_easy": {"metrics": {"acc": 0.625}, "stderr": {"acc": 0.01},
                                                "num_fewshot": 0}}}}
    assert update_card_eval(out, {"tasks": tasks})
    text = (out / "README.md").read_text()
    assert "| wiki | 1,024 | 7.389 |" in text and "| arc_easy | acc | 0.6250 |" in text
    assert front_matter(text)["model-index"][0]["results"]
    assert update_card_eval(out, EVAL_REF)  # perplexity again: the new table, the tasks kept
    text = (out / "README.md").read_text()
    assert "wiki" not in text and "| code | 512 | 2.718 |" in text and "| arc_easy | acc | 0.6250 |" in text
    assert text.count("## Evaluation") == 1 and "model-index" in text
