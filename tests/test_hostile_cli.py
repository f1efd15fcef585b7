"""Hostile input through the real command line (issue 18): crafted shard indexes, links out of the folder,
outputs placed on, in or around the input, full and read-only disks, kills in the middle of a write, two
writers to one output, config fields of the wrong type or range, and misleading wording.

Every refusal is checked the same way (`refused`): exit code 2, exactly one stderr line starting with
`Error:` and naming the file at fault, no traceback, and the whole test folder (input checkpoint, the
folders beside it and beside the output, the working directory) byte for byte as it was: names, sizes,
modes, sha256, link targets. So no input file changed, nothing was created outside `-o` and no temporary
folder was left. Legal inputs (`succeeds`) must write a flat, verifiable output and change nothing else.

Most cases run in-process (the `cli` fixture); kills and races run `python -m surgery.cli` through
`hostile_runner.py`, which only slows the writer's byte-range copies so a kill lands mid-write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result

from stats_factory import default_calibration, default_model, make_stats
from test_rewrite_errors import rewrite_header
from tiny_models import INDEX_NAME

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
KEEP = {"0": [0, 1, 2, 3, 5, 6], "2": [1, 2, 3, 4, 6, 7]}  # tiny qwen3_moe: MoE layers 0 and 2, 8 experts
SIDE = re.compile(r"moe-surgery-(tmp|old|lock)|stats-tmp|\.old-\d+")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# ---------------------------------------------------------------------------------------------
# the test folder and its snapshot


@dataclass
class World:
    root: Path  # everything a case may touch lives here
    model: Path  # root/in/model: the input checkpoint
    plan: Path  # root/in/plan.json
    out: Path  # root/out/o: the output (its parent exists)

    def shard(self, i: int) -> Path:
        return self.model / f"model-0000{i}-of-00005.safetensors"

    def edit_index(self, edit: Callable[[dict], None]) -> Path:
        path = self.model / INDEX_NAME
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
        return path

    def rename_shard(self, i: int, new_name: object) -> Path:
        """Point every tensor of shard `i` at `new_name` in the index."""
        old = self.shard(i).name
        return self.edit_index(lambda d: d["weight_map"].update(
            {k: new_name for k, v in d["weight_map"].items() if v == old}))

    def edit_config(self, **changes: object) -> Path:
        path = self.model / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
        return path


@pytest.fixture
def world(tmp_path: Path, tiny: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch) -> World:
    model = Path(shutil.copytree(tiny("qwen3_moe", "per-expert"), tmp_path / "in" / "model"))
    plan = tmp_path / "in" / "plan.json"
    plan.write_text(json.dumps({"keep": KEEP}))
    (tmp_path / "out").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # a relative write by mistake would land in the snapshot too
    return World(tmp_path, model, plan, tmp_path / "out" / "o")


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): kind, mode, size, sha256 or link target; `skip` and
    what lies under it are left out."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
    return entries


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if SIDE.search(p.name))


def error_lines(result: Result) -> list[str]:
    return [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith("Error:")]


def refused(world: World, cli: Callable[..., Result], *args: object, names: object, problem: str | None = None) -> str:
    """Run the CLI expecting a clean refusal that changes nothing under world.root; returns the Error line."""
    before = snapshot(world.root)
    result = cli(*args)
    text = result.stdout + result.stderr
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text and (result.exception is None or isinstance(result.exception, SystemExit)), text
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert str(names) in lines[0], f"{lines[0]!r} does not name {names}"
    if problem is not None:
        assert re.search(problem, lines[0], re.IGNORECASE), f"{lines[0]!r} does not say /{problem}/"
    assert snapshot(world.root) == before, "something under the test folder was created, changed or removed"
    assert not leftovers(world.root)
    return lines[0]


def succeeds(world: World, cli: Callable[..., Result], *args: object, out: Path | None = None,
             before: dict | None = None) -> Path:
    """Run the CLI expecting success: a flat output that `verify` accepts, nothing else changed (from
    `before`, a snapshot without the output, when given)."""
    out = out or world.out
    before = before if before is not None else snapshot(world.root, skip=out)
    result = cli(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert snapshot(world.root, skip=out) == before, "something outside -o was created, changed or removed"
    assert not leftovers(world.root)
    for p in out.rglob("*"):
        assert p.parent == out and p.is_file() and not p.is_symlink(), f"{p}: not a plain file directly in -o"
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights and all(SHARD.fullmatch(n) or n == "model.safetensors" for n in weights), weights
    assert cli("verify", out).exit_code == 0
    return out


def prune_args(world: World, *extra: object) -> tuple:
    return ("prune", world.model, "--plan", world.plan, "-o", world.out, *extra)


def sparsify_args(world: World, *extra: object) -> tuple:
    return ("sparsify", world.model, "--method", "magnitude", "--sparsity", "0.5", "-o", world.out, *extra)


COMMANDS = {"prune": prune_args, "sparsify": sparsify_args}


# ---------------------------------------------------------------------------------------------
# 1. crafted shard indexes


def _other_model(world: World) -> Path:
    """Another model on disk beside the input (what a crafted index would aim at)."""
    return Path(shutil.copytree(world.model, world.root / "in" / "other"))


INDEX_ATTACKS = {
    "dotdot into another model": lambda w: f"../other/{w.shard(3).name}",
    "dotdot beside the input": lambda w: f"../{w.shard(3).name}",
    "dotdot inside a subfolder": lambda w: f"sub/../{w.shard(3).name}",
    "absolute path": lambda w: str(w.root / "in" / "other" / w.shard(3).name),
    "backslash": lambda w: f"..\\other\\{w.shard(3).name}",
    "integer": lambda w: 3,
    "null": lambda w: None,
    "list": lambda w: [w.shard(3).name],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("attack", INDEX_ATTACKS)
def test_crafted_index_is_refused(world: World, cli, command: str, attack: str) -> None:
    _other_model(world)
    shutil.copyfile(world.shard(3), world.root / "in" / world.shard(3).name)
    index = world.rename_shard(3, INDEX_ATTACKS[attack](world))
    refused(world, cli, *COMMANDS[command](world), names=index)


@pytest.mark.parametrize("command", COMMANDS)
def test_shard_linked_out_of_the_folder_is_refused(world: World, cli, command: str) -> None:
    other = _other_model(world)
    world.shard(3).unlink()
    world.shard(3).symlink_to(other / world.shard(3).name)
    refused(world, cli, *COMMANDS[command](world), names=world.model / INDEX_NAME, problem="symbolic link")


@pytest.mark.parametrize("command", COMMANDS)
def test_subfolder_shard_is_legal_and_comes_out_flat(world: World, cli, command: str) -> None:
    (world.model / "sub").mkdir()
    world.shard(3).rename(world.model / "sub" / "x.safetensors")
    world.rename_shard(3, "sub/x.safetensors")
    out = succeeds(world, cli, *COMMANDS[command](world))
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert all(SHARD.fullmatch(v) for v in weight_map.values()) and not (out / "sub").exists()


def _hf_cache(world: World) -> Path:
    """The input laid out like the Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    repo = world.root / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in sorted(world.model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    shutil.rmtree(world.model)
    return snap


@pytest.mark.parametrize("command", COMMANDS)
def test_links_into_the_hf_cache_blobs_are_legal(world: World, cli, command: str) -> None:
    world.model = _hf_cache(world)  # shards, config, tokenizer files: all links into blobs/
    out = succeeds(world, cli, *COMMANDS[command](world))
    assert (out / "tokenizer_config.json").read_text() == "{}\n"


# ---------------------------------------------------------------------------------------------
# side files (tokenizer, README...) and outputs placed on, in or around the input


@pytest.mark.parametrize("command", COMMANDS)
def test_side_file_linked_out_is_refused(world: World, cli, command: str) -> None:
    secret = world.root / "in" / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (world.model / "tokenizer.json").symlink_to(secret)
    refused(world, cli, *COMMANDS[command](world), names=world.model / "tokenizer.json", problem="outside")


def test_side_folder_linked_out_is_refused(world: World, cli) -> None:
    (world.root / "in" / "elsewhere").mkdir()
    (world.root / "in" / "elsewhere" / "notes.txt").write_text("private\n")
    (world.model / "extra").symlink_to(world.root / "in" / "elsewhere")
    refused(world, cli, *prune_args(world), names=world.model / "extra", problem="outside")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_inside_the_input_is_refused(world: World, cli, command: str, overwrite: bool) -> None:
    world.out = world.model / "pruned"
    refused(world, cli, *COMMANDS[command](world, *(["--overwrite"] if overwrite else [])), names=world.out,
            problem="inside the input")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_containing_the_input_is_refused_before_anything_is_removed(world: World, cli, command: str) -> None:
    world.out = world.root / "in"
    refused(world, cli, *COMMANDS[command](world, "--overwrite"), names=world.out, problem="contains the input")


@pytest.mark.parametrize("via", ["same path", "link to the input"])
def test_output_that_is_the_input_is_refused(world: World, cli, via: str) -> None:
    if via == "same path":
        world.out = world.model
    else:
        world.out.symlink_to(world.model)
    refused(world, cli, *prune_args(world, "--overwrite"), names=world.out, problem="must differ")


def test_existing_output_needs_overwrite(world: World, cli) -> None:
    world.out.mkdir()
    (world.out / "mine.txt").write_text("keep me\n")
    refused(world, cli, *prune_args(world), names=world.out, problem="already exists")


# ---------------------------------------------------------------------------------------------
# 2. full and read-only disks (patched writers), places that cannot be written


def _failing(code: int) -> Callable:
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("command, extra", [("prune", ()), ("prune", ("--hash-shards",)), ("sparsify", ())])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_write_fails_midway(world: World, cli, monkeypatch: pytest.MonkeyPatch, command: str, extra: tuple,
                            code: int) -> None:
    monkeypatch.setattr(os, "write", _failing(code))
    if hasattr(os, "copy_file_range"):
        monkeypatch.setattr(os, "copy_file_range", _failing(code))
    line = refused(world, cli, *COMMANDS[command](world, *extra), names=world.out, problem=re.escape(os.strerror(code)))
    assert "\n" not in line


def test_output_folder_cannot_be_created(world: World, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if "moe-surgery-tmp" in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    refused(world, cli, *prune_args(world), names=world.out, problem="read-only")


def test_output_is_a_file(world: World, cli) -> None:
    world.out.write_text("a file\n")
    refused(world, cli, *prune_args(world, "--overwrite"), names=world.out, problem="is a file, not a folder")


def test_output_parent_is_a_file(world: World, cli) -> None:
    (world.root / "out" / "f").write_text("a file\n")
    world.out = world.root / "out" / "f" / "o"
    refused(world, cli, *prune_args(world), names=world.root / "out" / "f", problem="is a file")


# ---------------------------------------------------------------------------------------------
# 3. config fields of the wrong type or range, expert tensors of the wrong shape: prune, sparsify, verify

CONFIGS = {
    "top-k 0": ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    "top-k above the experts": ({"num_experts_per_tok": 9}, "exceeds"),
    "experts as a string": ({"num_experts": "8"}, "num_experts must be an integer"),
    "experts as a bool": ({"num_experts": True}, "num_experts must be an integer"),
    "too few layers": ({"num_hidden_layers": 1}, "num_hidden_layers"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_verify_refuses_bad_config(world: World, cli, case: str) -> None:
    changes, problem = CONFIGS[case]
    config = world.edit_config(**changes)
    line = refused(world, cli, "verify", world.model, names=world.model, problem=r"1 problem")
    assert line == f"Error: {world.model}: 1 problem"
    result = cli("verify", world.model)
    assert str(config) in result.stderr.splitlines()[1] and re.search(problem, result.stderr)


@pytest.mark.parametrize("case", ["experts as a string", "top-k 0"])
def test_sparsify_refuses_bad_config(world: World, cli, case: str) -> None:
    changes, problem = CONFIGS[case]
    config = world.edit_config(**changes)
    refused(world, cli, *sparsify_args(world), names=config, problem=problem)


def test_verify_and_prune_refuse_an_expert_of_the_wrong_shape(world: World, cli) -> None:
    """[I, H] stored as [I/2, 2H]: byte counts agree, the output would not load."""
    shard = next(p for p in world.model.glob("*.safetensors") if b"experts.3.up_proj" in p.read_bytes()[:65536])

    def reshape(header: dict) -> None:
        name = next(k for k in header if k.endswith("mlp.experts.3.up_proj.weight"))
        header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1] * 2]

    rewrite_header(shard, reshape)
    refused(world, cli, "verify", world.model, names=world.model)
    assert "experts.3.up_proj" in cli("verify", world.model).stderr
    refused(world, cli, *prune_args(world), names="experts.3.up_proj")


@pytest.mark.parametrize("attack", ["dotdot into another model", "absolute path", "integer", "list"])
def test_verify_refuses_crafted_index(world: World, cli, attack: str) -> None:
    _other_model(world)
    index = world.rename_shard(3, INDEX_ATTACKS[attack](world))
    refused(world, cli, "verify", world.model, names=world.model, problem="1 problem")
    assert str(index) in cli("verify", world.model).stderr.splitlines()[1]


def test_verify_refuses_a_side_file_linked_out(world: World, cli) -> None:
    """`push` uploads what verify accepts: a link to a private file must not pass."""
    (world.root / "in" / "id_rsa").write_text("secret\n")
    (world.model / "tokenizer.json").symlink_to(world.root / "in" / "id_rsa")
    refused(world, cli, "verify", world.model, names=world.model)


def test_push_refuses_a_side_file_linked_out(world: World, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    (world.root / "in" / "id_rsa").write_text("secret\n")
    (world.model / "tokenizer.json").symlink_to(world.root / "in" / "id_rsa")
    refused(world, cli, "push", world.model, "org/name", names="tokenizer.json", problem="not pushed")


# ---------------------------------------------------------------------------------------------
# misleading wording (issue 18, last list)


def test_wording_shard_that_is_a_directory(world: World, cli) -> None:
    world.shard(2).unlink()
    world.shard(2).mkdir()
    refused(world, cli, *prune_args(world), names=world.shard(2).name, problem="a directory, not a file")


def test_wording_model_that_is_a_file(world: World, cli) -> None:
    model = world.root / "in" / "model.bin"
    model.write_bytes(b"\0" * 16)
    world.model = model
    refused(world, cli, *prune_args(world), names=model, problem="is a file, not a checkpoint folder")


def test_wording_reversed_offsets(world: World, cli) -> None:
    shard = world.shard(5)

    def reverse(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = header[name]["data_offsets"][::-1]

    rewrite_header(shard, reverse)
    line = refused(world, cli, *prune_args(world), names=shard, problem="reversed")
    assert "truncated" not in line


def test_wording_heal_with_the_student_as_teacher(world: World, cli) -> None:
    student = world.root / "out" / "student"
    assert cli(*prune_args(world)[:-1], student).exit_code == 0
    data = world.root / "in" / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    refused(world, cli, "heal", student, "--teacher", student, "-d", data, "-o", world.out, names=student,
            problem="teacher is the student itself")


# ---------------------------------------------------------------------------------------------
# statistics files (stats merge): disk full, read-only


@pytest.fixture
def stats_pair(world: World) -> tuple[Path, Path]:
    from stats_formats import StatsFile

    model = default_model()
    paths = []
    for seed in (0, 1):
        path = world.root / "in" / f"s{seed}.safetensors"
        StatsFile.from_arrays(model, default_calibration(num_tokens=32), make_stats(model, 32, seed)).save(path)
        paths.append(path)
    return paths[0], paths[1]


def test_stats_merge_disk_full(world: World, cli, stats_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    import stats_formats.file as stats_file
    from safetensors import SafetensorError

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a half-written temporary file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(stats_file, "save_file", full)
    target = world.root / "out" / "merged.safetensors"
    refused(world, cli, "stats", "merge", *stats_pair, "-o", target, names=target, problem="No space left")


def test_stats_merge_read_only(world: World, cli, stats_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open

    def ro(path, flags, *args, **kwargs):
        if "stats-tmp" in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro)
    target = world.root / "out" / "merged.safetensors"
    refused(world, cli, "stats", "merge", *stats_pair, "-o", target, names=target, problem="read-only")


def test_stats_merge_mode_follows_the_umask(world: World, cli, stats_pair) -> None:
    target = world.root / "out" / "merged.safetensors"
    old = os.umask(0o027)
    try:
        assert cli("stats", "merge", *stats_pair, "-o", target).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and not leftovers(world.root)


# ---------------------------------------------------------------------------------------------
# demo: options and the work folder are checked before any work


@pytest.mark.parametrize("args, names", [
    (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "0.95"], "--ratio 0.95"),
    (["--steps", "-1"], "--steps"),
    (["--workdir", "{existing}"], "{existing}"),
    (["--workdir", "{existing}", "--overwrite"], "{existing}"),
])
def test_demo_refuses_before_any_work(world: World, cli, args: list[str], names: str) -> None:
    existing = world.root / "out" / "moe-surgery-demo"
    existing.mkdir()
    (existing / "thesis.tex").write_text("not a demo file\n")
    args = [a.format(existing=existing) for a in args]
    start = time.perf_counter()
    refused(world, cli, "demo", *args, names=names.format(existing=existing))
    assert time.perf_counter() - start < 5, "the demo started working before refusing"


# ---------------------------------------------------------------------------------------------
# 4. kills in the middle of the write, and two writers at once (subprocesses)


def _start(world: World, delay_ms: float, *args: object) -> subprocess.Popen:
    """`moe-surgery ARGS` in a subprocess whose writer sleeps `delay_ms` before every byte-range copy."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, str(TESTS / "hostile_runner.py"), str(delay_ms), *map(str, args)],
                            cwd=world.root / "work", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path})


def _wait_for_tmp(world: World, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Until the run's temporary output folder exists (the write has begun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("moe-surgery-tmp" in p.name for p in world.out.parent.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before writing: {proc.communicate()}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the run did not start writing in time")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("sig, seed", [(signal.SIGKILL, 1), (signal.SIGKILL, 2), (signal.SIGTERM, 3)])
def test_killed_mid_write(world: World, cli, command: str, sig: int, seed: int) -> None:
    """Killed at a seeded random moment of the write: the input is untouched, SIGTERM leaves nothing,
    and after SIGKILL the next run succeeds and removes the dead run's temporary folder and lock."""
    inputs = snapshot(world.root / "in")
    before = snapshot(world.root, skip=world.out)
    proc = _start(world, 8, *COMMANDS[command](world))
    _wait_for_tmp(world, proc)
    time.sleep(random.Random(seed).uniform(0, 0.25))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert snapshot(world.root / "in") == inputs
    assert "Traceback" not in err, err
    if proc.returncode == 0:  # finished before the signal arrived
        assert cli("verify", world.out).exit_code == 0
        shutil.rmtree(world.out)
    else:
        assert proc.returncode in (-sig, 128 + sig), (proc.returncode, err)
        assert not world.out.exists()
    if sig == signal.SIGTERM:
        assert not leftovers(world.root) and snapshot(world.root, skip=world.out) == before
    else:
        assert leftovers(world.root) or proc.returncode == 0  # what SIGKILL leaves for the next run to clean
    succeeds(world, cli, *COMMANDS[command](world), before=before)


@pytest.mark.parametrize("overwrite", [False, True])
def test_second_writer_to_the_same_output_is_refused(world: World, cli, overwrite: bool) -> None:
    first = _start(world, 15, *prune_args(world))
    _wait_for_tmp(world, first)
    try:
        refused_line = cli(*sparsify_args(world, *(["--overwrite"] if overwrite else [])))
        assert refused_line.exit_code == 2
        (line,) = error_lines(refused_line)
        assert str(world.out) in line and "another moe-surgery run is writing" in line
    finally:
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "experts per MoE layer" in out and not leftovers(world.root)
    assert cli("verify", world.out).exit_code == 0
    assert json.loads((world.out / "pruning.json").read_text()).get("sparsity") is None  # the first run's output
