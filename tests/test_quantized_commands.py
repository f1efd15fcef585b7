"""`eval` and `prune --stats` on quantized checkpoints (FP8 block/channel/tensor, NVFP4, MXFP4) against their
dequantized float32 copies, and bad quantized input turned into one-line errors by collect (in memory and
streamed, checked before any compute), sparsify, eval and prune --plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import Result

from quantized_models import BUILDERS
from test_collect_quantized import _tokenizer, data_file, models, root  # noqa: F401,F811 (fixtures)
from test_quantization import BAD, _edit
from tiny_models import NUM_EXPERTS, masked_logits, moe_layers

import surgery.model.streaming as streaming
from surgery.model.load import load_model

SCHEMES = list(BUILDERS)
PPL_TOL = 1e-4  # relative: the same float32 weights, summed in possibly another order
LOGIT_TOL = 1e-5
MIN_EFFECT = 1e-3


def _eval(cli: Callable[..., Result], model: Path, data: Path, *extra: str | Path) -> dict:
    result = cli("eval", model, "-d", data, "--max-tokens", "256", "--seq-len", "32", "--device", "cpu", "--json",
                 *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_equals_the_dequantized_copy(scheme: str, models, data_file: Path, cli: Callable[..., Result]) -> None:
    """Perplexity of the quantized checkpoint (loaded dequantized on the CPU) equals its float32 copy's; with the
    copy as --reference the two predict the same distributions (KL 0, top-1 agreement 1)."""
    q, d = models(scheme)
    got = _eval(cli, q, data_file, "--dtype", "float32", "--reference", d)
    want = _eval(cli, d, data_file, "--dtype", "float32")
    (g,), (w,) = got["files"], want["files"]
    assert g["tokens"] == w["tokens"] > 0
    assert abs(g["ppl"] - w["ppl"]) <= PPL_TOL * w["ppl"], (g["ppl"], w["ppl"])
    assert abs(got["kl"]) <= 1e-6 and got["top1"] == 1.0
    # dtype auto keeps the checkpoint's bf16: the same model rounded once, a close perplexity
    auto = _eval(cli, q, data_file)["files"][0]
    assert auto["tokens"] == w["tokens"] and abs(auto["ppl"] - w["ppl"]) <= 0.05 * w["ppl"]


# ---------------------------------------------------------------------------------------------
# prune --stats: the equivalence with masked routers (tests/test_rewrite_equivalence.py, for quantized checkpoints)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prune_by_stats_equals_the_masked_dequantized_original(scheme: str, models, data_file: Path, root: Path,
                                                                cli: Callable[..., Result]) -> None:
    q, d = models(scheme)
    stats = root / f"{scheme}.stats.safetensors"
    result = cli("collect", q, "-d", data_file, "-o", stats, "--samples", "6", "--seq-len", "16", "--device", "cpu",
                 "--dtype", "float32")
    assert result.exit_code == 0, result.output
    out = root / f"{scheme}-pruned"
    result = cli("prune", q, "--stats", stats, "--criterion", "reap", "--ratio", "0.25", "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0
    info = json.loads((out / "pruning.json").read_text())
    n = info["num_experts_before"]
    drop = {int(layer): sorted(set(range(n)) - set(ids)) for layer, ids in info["expert_map"].items()}
    assert all(len(ids) == n // 4 for ids in drop.values())
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = load_model(out, "cpu", torch.float32)(input_ids=ids).logits
    want = masked_logits(d, drop, ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= LOGIT_TOL
    assert (got - masked_logits(d, {}, ids)).abs().max().item() > MIN_EFFECT, "dropping experts must change the output"


# ---------------------------------------------------------------------------------------------
# Bad input


COMMANDS = ["collect", "collect-streamed", "sparsify", "eval", "prune-plan"]


def _args(command: str, bad: Path, out: Path, data: Path, plan: Path) -> list:
    run = ["--samples", "2", "--seq-len", "16", "--device", "cpu", "--dtype", "float32"]
    return {
        "collect": ["collect", bad, "-d", data, "-o", out, *run],
        "collect-streamed": ["collect", bad, "-d", data, "-o", out, *run, "--stream-layers"],
        "sparsify": ["sparsify", bad, "--method", "magnitude", "--sparsity", "0.5", "-o", out],
        "eval": ["eval", bad, "-d", data, "--max-tokens", "64", "--seq-len", "16", "--device", "cpu"],
        "prune-plan": ["prune", bad, "--plan", plan, "-o", out],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_input_is_one_line_exit_2_nothing_written(case: str, command: str, models, data_file: Path,
                                                               cli: Callable[..., Result], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed collect refuses before any layer runs (stream_forward is never reached)."""
    def no_compute(*args, **kwargs):
        raise AssertionError("the bad checkpoint must be refused before any compute")

    monkeypatch.setattr(streaming, "stream_forward", no_compute)
    scheme, tensors_edit, config_edit, words = BAD[case]
    q, d = models(scheme)
    bad = _tokenizer(_edit(q, tmp_path / "bad", tensors_edit, config_edit))
    n = NUM_EXPERTS  # drop experts 0 and n/2: one per router group where there are two groups
    plan = tmp_path.parent / f"{tmp_path.name}-plan.json"
    plan.write_text(json.dumps({"keep": {str(layer): [e for e in range(n) if e not in (0, n // 2)]
                                         for layer in moe_layers(d)}}))
    out = tmp_path / "out"
    result = cli(*_args(command, bad, out, data_file, plan))
    assert result.exit_code == 2, result.output
    message = (result.stderr if result.stderr_bytes is not None else result.output).strip().splitlines()[-1]
    assert message.startswith("Error: "), result.output
    for word in words:  # the up-front check meets another tensor first: the block size it implies differs
        word = "blocks of about" if word.startswith("blocks of about") else word
        assert word in message, (word, message)
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
