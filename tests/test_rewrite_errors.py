"""Bad input to `moe-surgery prune`: exit code 2, one line naming the file and the problem,
no output (nor temporary) folder, and the input folder untouched."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result

from tiny_models import INDEX_NAME, folder_digest

# The tiny qwen3_moe has MoE layers 0 and 2 (8 experts, top-2) and a dense layer 1.
GOOD_KEEP = {0: [0, 1, 2, 3, 5, 6], 2: [1, 2, 3, 4, 6, 7]}


@pytest.fixture
def src(tmp_path: Path, tiny: Callable[[str, str], Path]) -> Path:
    """A private copy of the tiny qwen3_moe checkpoint (tests corrupt it)."""
    return Path(shutil.copytree(tiny("qwen3_moe", "per-expert"), tmp_path / "model"))


def write_plan(path: Path, keep: dict[int, list[int]]) -> Path:
    path.write_text(json.dumps({"keep": {str(k): v for k, v in keep.items()}}))
    return path


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Re-encode a shard's header after `edit` changes it in place; the data section is kept."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def fails(cli: Callable[..., Result], src: Path, plan: Path, *extra: str) -> str:
    """Run prune expecting a clean refusal; returns the single line it printed."""
    out = src.parent / "out"
    before = folder_digest(src)
    existing = folder_digest(out) if out.exists() else None
    result = cli("prune", src, "--plan", plan, "-o", out, *extra)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert folder_digest(src) == before, "input folder changed"
    assert (folder_digest(out) if out.exists() else None) == existing, "output folder created or changed"
    assert not [p.name for p in src.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left"
    return lines[0]


def assert_names(line: str, file: Path, problem: str) -> None:
    assert file.name in line, f"message does not name {file.name}: {line}"
    assert re.search(problem, line, re.IGNORECASE), f"message does not say /{problem}/: {line}"


def test_truncated_shard(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert_names(line, shard, r"truncat|out of range|end of file")


def test_corrupt_header_json(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[0]
    raw = bytearray(shard.read_bytes())
    raw[9] = ord("#")  # the first quote of the first key
    shard.write_bytes(bytes(raw))
    assert_names(fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP)), shard, r"header.*json|json.*header")


def test_header_length_beyond_file_size(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[0]
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2 * len(raw)) + raw[8:])
    assert_names(fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP)), shard, r"header length")


def test_overlapping_offsets(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[-1]

    def overlap(header: dict) -> None:
        second = header[by_offset(header)[1]]
        second["data_offsets"] = [o - 8 for o in second["data_offsets"]]

    rewrite_header(shard, overlap)
    assert_names(fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP)), shard, r"overlap")


def test_offsets_out_of_range(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[-1]

    def past_end(header: dict) -> None:
        last = header[by_offset(header)[-1]]
        last["data_offsets"] = [o + 8 for o in last["data_offsets"]]

    rewrite_header(shard, past_end)
    assert_names(fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP)), shard, r"out of range")


def test_index_names_missing_shard(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    shard = shards(src)[0]
    shard.unlink()
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert_names(line, src / INDEX_NAME, r"missing|not found|no such")
    assert shard.name in line


def test_plan_ids_out_of_range(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = write_plan(tmp_path / "plan.json", {0: [0, 1, 2, 3, 5, 99], 2: GOOD_KEEP[2]})
    assert_names(fails(cli, src, plan), plan, r"99.*(outside|range)|(outside|range).*99")


def test_plan_duplicate_ids(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = write_plan(tmp_path / "plan.json", {0: [0, 1, 2, 3, 3, 6], 2: GOOD_KEEP[2]})
    assert_names(fails(cli, src, plan), plan, r"more than once|duplicate")


def test_plan_layer_without_experts(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = write_plan(tmp_path / "plan.json", {**GOOD_KEEP, 1: [0, 1, 2, 3, 4, 5]})
    assert_names(fails(cli, src, plan), plan, r"layer 1\b.*(no experts|not an? moe)")


def test_plan_keeps_fewer_than_top_k(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = write_plan(tmp_path / "plan.json", {0: [3], 2: [5]})
    assert_names(fails(cli, src, plan), plan, r"top-?k")


def test_plan_nonuniform_without_flag(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = write_plan(tmp_path / "plan.json", {0: [0, 1, 2, 3, 5, 6], 2: [1, 2, 3, 4, 6]})
    assert_names(fails(cli, src, plan), plan, r"nonuniform|non-uniform|different")


def test_plan_not_json(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"keep": {"0": [0, 1,')
    assert_names(fails(cli, src, plan), plan, r"json")


def test_unknown_model_type(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert_names(line, src / "config.json", r"model_type.*llama.*not supported|not supported.*llama")


def test_existing_output_folder(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("not a checkpoint\n")
    assert_names(fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP)), out, r"exists")


def test_good_plan_is_accepted(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """The baseline every error test perturbs is itself valid."""
    result = cli("prune", src, "--plan", write_plan(tmp_path / "plan.json", GOOD_KEEP), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert cli("verify", tmp_path / "out").exit_code == 0
