"""`eval --stride`: overlapping perplexity windows score every token once, with more context."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from surgery.eval.perplexity import evaluate
from surgery.model.data import DataError, eval_windows
from surgery.model.load import load_model, load_tokenizer
from tiny_models import build_tiny
from tiny_tokenizer import save_tiny_tokenizer

WORDS = "the a expert router token layer model prune gate weight sparse dense mixture of".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stride")
    path = build_tiny("qwen3_moe", root / "model", layout="per-expert")
    save_tiny_tokenizer(path, vocab_size=128)
    rng = random.Random(4)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n"
                            for _ in range(10)))
    return load_model(path), load_tokenizer(path), str(data)


def direct_nll(model, stream: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Mean NLL over the tokens windows starting every `stride` cover, each token predicted in the first
    window that can (token 0 never), computed window by window from the model's logits."""
    total, scored, covered = 0.0, 0, 0
    for start in range(0, len(stream) - seq_len + 1, stride):
        window = stream[start:start + seq_len]
        with torch.no_grad():
            logp = F.log_softmax(model(window[None]).logits[0].float(), -1)
        for j in range(1, seq_len):
            if start + j >= covered:
                total -= logp[j - 1, window[j]].item()
                scored += 1
        covered = start + seq_len
    return total / scored, scored


@pytest.mark.parametrize("stride", [48, 47, 16])  # 47: windows share one token
def test_overlapping_windows_match_direct_computation(setup, stride: int) -> None:
    model, tokenizer, data = setup
    seq_len, max_tokens = 48, 200
    result = evaluate(model, tokenizer, [data], seq_len=seq_len, max_tokens=max_tokens, batch_size=3,
                      stride=stride, progress=False)
    stream = eval_windows(data, tokenizer, max_tokens, max_tokens)[0]
    nll, scored = direct_nll(model, stream, seq_len, stride)
    f = result["files"][0]
    windows = (max_tokens - seq_len) // stride + 1
    assert f["windows"] == windows and f["tokens"] == seq_len + (windows - 1) * stride
    assert scored == (windows * (seq_len - 1) if stride == seq_len else f["tokens"] - 1)
    assert f["nll"] == pytest.approx(nll, rel=1e-5) and result["stride"] == stride
    assert f["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_default_stride_and_bad_stride_is_refused(setup) -> None:
    model, tokenizer, data = setup
    plain = evaluate(model, tokenizer, [data], seq_len=32, max_tokens=200, progress=False)
    assert plain["stride"] == 32
    with pytest.raises(DataError, match="--stride 0 must be between 1 and --seq-len 32"):
        eval_windows(data, tokenizer, 32, 200, stride=0)


def test_cli_stride_longer_than_window_is_one_line(setup, cli, tmp_path) -> None:
    _, _, data = setup
    r = cli("eval", tmp_path, "-d", data, "--seq-len", "32", "--stride", "64")
    assert r.exit_code == 2 and r.output.strip() == "Error: --stride 64 is longer than --seq-len 32: tokens would be skipped"
