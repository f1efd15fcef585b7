"""config.json fields of the wrong type or range, and expert tensors of the wrong shape: `prune` refuses
them with one line naming the file (exit 2) instead of writing a checkpoint that will not load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result

from test_rewrite_errors import GOOD_KEEP, fails, rewrite_header, shards, write_plan


@pytest.fixture
def src(tmp_path: Path, tiny: Callable[[str, str], Path]) -> Path:
    return Path(shutil.copytree(tiny("qwen3_moe", "per-expert"), tmp_path / "model"))


def edit_config(src: Path, **changes: object) -> Path:
    path = src / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"num_experts_per_tok": 0}, r"num_experts_per_tok must be an integer ≥ 1, not 0"),
        ({"num_experts_per_tok": 9}, r"9 experts per token exceeds the 8 routed experts"),
        ({"num_experts": "8"}, r"num_experts must be an integer ≥ 1, not '8'"),
        ({"num_experts": 8.0}, r"num_experts must be an integer"),
        ({"num_experts": True}, r"num_experts must be an integer"),
        ({"num_hidden_layers": 1}, r"num_hidden_layers is 1, but the tensors hold MoE layer 2"),
        ({"num_hidden_layers": "3"}, r"num_hidden_layers must be an integer"),
    ],
)
def test_bad_config_counts(src: Path, tmp_path: Path, cli: Callable[..., Result], changes: dict, problem: str) -> None:
    config = edit_config(src, **changes)
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert str(config) in line and re.search(problem, line), line


def _reshape(name_suffix: str, new_shape: Callable[[list[int]], list[int]]) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        name = next(k for k in header if k.endswith(name_suffix))
        header[name]["shape"] = new_shape(header[name]["shape"])

    return edit


def test_expert_tensor_same_bytes_other_shape(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """[I, H] stored as [I/2, 2H]: byte ranges and counts all agree, only the shape is wrong."""
    shard = next(s for s in shards(src) if b"experts.3.up_proj" in s.read_bytes()[:65536])
    rewrite_header(shard, _reshape("mlp.experts.3.up_proj.weight", lambda s: [s[0] // 2, s[1] * 2]))
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert "experts.3.up_proj.weight" in line and "hidden_size" in line, line


def test_expert_tensor_unlike_its_siblings(src: Path, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """One expert's matrix stored 3-D: still a hidden_size side, but unlike its siblings."""
    shard = next(s for s in shards(src) if b"experts.5.down_proj" in s.read_bytes()[:65536])
    rewrite_header(shard, _reshape("mlp.experts.5.down_proj.weight", lambda s: [s[0] // 2, 2, s[1]]))
    line = fails(cli, src, write_plan(tmp_path / "plan.json", GOOD_KEEP))
    assert "experts.5.down_proj.weight" in line and "other experts" in line, line


@pytest.mark.parametrize("counts", [{"0": "6"}, {"zero": 6}, {"1": 6}, [6, 6], {"0": 0}])
def test_verify_refuses_bad_per_layer_counts(src: Path, counts: object) -> None:
    """`moe_surgery_experts_per_layer` is read from an untrusted config: a bad one is a one-line error."""
    from surgery.architectures import ArchitectureError
    from surgery.hub.verify import verify_checkpoint

    config = edit_config(src, moe_surgery_experts_per_layer=counts)
    with pytest.raises(ArchitectureError, match="moe_surgery_experts_per_layer") as info:
        verify_checkpoint(src)
    assert str(config) in str(info.value) and "\n" not in str(info.value)


def test_verify_reports_a_non_numeric_total_size(src: Path) -> None:
    from surgery.hub.verify import verify_checkpoint

    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["metadata"] = {"total_size": "many"}
    index.write_text(json.dumps(doc))
    assert any("total_size 'many'" in p for p in verify_checkpoint(src))
