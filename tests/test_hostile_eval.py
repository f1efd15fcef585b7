"""`eval` on bad input: a damaged checkpoint, a wrong expert shape, a reference with another vocabulary.
Each gets one `Error:` line naming the file and exit code 2, never a traceback from transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import Result
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from test_rewrite_errors import rewrite_header
from tiny_tokenizer import save_tiny_tokenizer


def _save(path: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("model"), 256)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"the expert router {i} token layer."}) + "\n" for i in range(20)))
    return path


def one_error(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr  # progress bars may precede it
    assert result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def test_reference_with_another_vocabulary(tmp_path: Path, model: Path, data: Path, cli: Callable[..., Result]) -> None:
    other = _save(tmp_path / "other", 128)
    line = one_error(cli("eval", model, "-d", data, "--reference", other, "--seq-len", "16", "--max-tokens", "32"))
    assert str(other) in line and "vocabulary" in line, line


def test_damaged_shard(tmp_path: Path, model: Path, data: Path, cli: Callable[..., Result]) -> None:
    copy = Path(shutil.copytree(model, tmp_path / "damaged"))
    shard = copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    line = one_error(cli("eval", copy, "-d", data, "--seq-len", "16", "--max-tokens", "32"))
    assert str(shard) in line, line


def test_expert_tensor_of_the_wrong_shape(tmp_path: Path, model: Path, data: Path, cli: Callable[..., Result]) -> None:
    copy = Path(shutil.copytree(model, tmp_path / "reshaped"))

    def edit(header: dict) -> None:
        name = next(k for k in header if k.endswith("layers.0.mlp.experts.gate_up_proj") or
                    k.endswith("layers.0.mlp.experts.2.gate_proj.weight"))
        header[name]["shape"] = header[name]["shape"][:-2] + [header[name]["shape"][-1], header[name]["shape"][-2]]

    rewrite_header(copy / "model.safetensors", edit)
    line = one_error(cli("eval", copy, "-d", data, "--seq-len", "16", "--max-tokens", "32"))
    assert "config.json" in line and "shape" in line, line
