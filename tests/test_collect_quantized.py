"""`collect` on quantized checkpoints (FP8 block/channel/tensor, NVFP4, MXFP4): the weights are read
dequantized, in memory and with --stream-layers, and the statistics equal those of the checkpoint's
dequantized float32 copy (tests/quantized_models.py, made with the reference dequantizers); the file
records the source's scheme; `prune --stats` then cuts the quantized checkpoint; bad input is one line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import Result

from quantized_models import BUILDERS, _load, _save, dequantized_copy
from stats_formats import StatsFile
from tiny_tokenizer import save_tiny_tokenizer

from surgery.collect.run import collect
from surgery.io import Checkpoint
from surgery.io.quantization import scheme_for
from surgery.model.load import load_model
from surgery.model.weights import estimate_bytes

SCHEMES = list(BUILDERS)  # deepseek_fp8 (MTP, e_score_correction_bias), qwen3_fp8, qwen3_fp8_fused, glm_ct_fp8,
# glm_ct_fp8_tensor, gpt_oss_mxfp4, qwen3_nvfp4
RUN = dict(samples=4, seq_len=24, holdout=2, batch_size=2, seed=3, histogram=True, device="cpu", dtype="float32",
           progress=False)
TOL = 1e-5  # the same float32 weights; only the order of float32 sums may differ
EXACT = ("count", "tokens", "coselect", "token_bits")  # integers counted from the same routing decisions
METHODS = {"deepseek_fp8": "fp8", "qwen3_fp8": "fp8", "qwen3_fp8_fused": "fp8", "glm_ct_fp8": "compressed-tensors",
           "glm_ct_fp8_tensor": "compressed-tensors", "gpt_oss_mxfp4": "mxfp4", "qwen3_nvfp4": "compressed-tensors"}


def _tokenizer(path: Path) -> Path:
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size") or 128
    save_tiny_tokenizer(path, vocab_size=min(256, vocab))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("collect-quantized")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    rng = random.Random(11)
    words = "expert router token layer model prune gate weight sparse dense 42 7 , . ! the a of".split()
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 25)))})
                            + "\n" for _ in range(60)))
    return path


@pytest.fixture(scope="module")
def models(root: Path) -> Callable[[str], tuple[Path, Path]]:
    """`models(scheme)`: (the quantized checkpoint, its dequantized float32 copy), with a tokenizer, built once."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(scheme: str) -> tuple[Path, Path]:
        if scheme not in cache:
            q = _tokenizer(BUILDERS[scheme](root / scheme))
            cache[scheme] = q, _tokenizer(dequantized_copy(q, root / f"{scheme}-dequantized"))
        return cache[scheme]

    return get


@pytest.fixture(scope="module")
def stats(root: Path, models, data_file: Path) -> Callable[[str, str, bool], StatsFile]:
    """`stats(scheme, "quantized" | "dequantized", streamed)`: collected once per module."""
    cache: dict[tuple, StatsFile] = {}

    def get(scheme: str, which: str, streamed: bool) -> StatsFile:
        key = (scheme, which, streamed)
        if key not in cache:
            src = models(scheme)[0 if which == "quantized" else 1]
            out = root / f"{scheme}-{which}-{'streamed' if streamed else 'memory'}.safetensors"
            collect(src, [str(data_file)], out, stream_layers=streamed, prefetch=streamed, **RUN)
            cache[key] = StatsFile(out)
        return cache[key]

    return get


def same_stats(actual: StatsFile, expected: StatsFile) -> None:
    a, e = actual._source.all_tensors(), expected._source.all_tensors()
    assert sorted(a) == sorted(e)
    bad = []
    for name in sorted(e):
        x, y = np.asarray(a[name], np.float64), np.asarray(e[name], np.float64)
        assert x.shape == y.shape, name
        if any(name.endswith(k) for k in EXACT):
            if not np.array_equal(x, y):
                bad.append(f"{name}: counts differ")
            continue
        err = float(np.abs(x - y).max() / max(float(np.abs(y).max()), 1e-12)) if y.size else 0.0
        if not err <= TOL:
            bad.append(f"{name}: rel err {err:.3e}")
    assert not bad, "\n".join(bad)
    for key in ("num_tokens", "num_sequences", "holdout_sequences", "seq_len", "seed"):
        assert actual.calibration[key] == expected.calibration[key], key
    ident = ("config_sha256", "router_sha256")  # config.json differs (quantization_config, dtype)
    assert {k: v for k, v in actual.model.items() if k not in ident} == \
        {k: v for k, v in expected.model.items() if k not in ident}


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_model_equals_dequantized_copy(scheme: str, models) -> None:
    """The in-memory loader gives a plain model whose every parameter equals the float32 copy's bit for bit."""
    q, d = models(scheme)
    mq, md = load_model(q, "cpu", torch.float32), load_model(d, "cpu", torch.float32)
    assert getattr(mq.config, "quantization_config", None) is None
    assert not hasattr(mq, "hf_quantizer") or mq.hf_quantizer is None
    sq, sd = mq.state_dict(), md.state_dict()
    assert sorted(sq) == sorted(sd)
    for name, t in sd.items():
        assert sq[name].dtype == t.dtype and sq[name].shape == t.shape, name
        assert torch.equal(sq[name], t), name
    # in bf16 too: the float32 values rounded once
    mb = load_model(q, "cpu", torch.bfloat16)
    for name, t in mb.state_dict().items():
        if t.dtype == torch.bfloat16:
            assert torch.equal(t, sd[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_estimate_counts_dequantized_values(scheme: str, models) -> None:
    """check_fits and `--stream-layers` auto see the model's size in the compute dtype, scales not counted."""
    q, d = models(scheme)
    with Checkpoint(q) as cq, Checkpoint(d) as cd:
        assert estimate_bytes(cq, torch.bfloat16) == estimate_bytes(cd, torch.bfloat16)
        assert estimate_bytes(cq, torch.float32) == estimate_bytes(cd, torch.float32)


# ---------------------------------------------------------------------------------------------
# Collecting


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "streamed"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_collect_equals_dequantized_copy(scheme: str, streamed: bool, stats) -> None:
    quantized = stats(scheme, "quantized", streamed)
    same_stats(quantized, stats(scheme, "dequantized", streamed))
    assert quantized.calibration["quantization"]["method"] == METHODS[scheme]
    assert quantized.calibration["quantization"]["scheme"]
    assert "quantization" not in stats(scheme, "dequantized", streamed).calibration


@pytest.mark.parametrize("scheme", ["deepseek_fp8", "gpt_oss_mxfp4", "qwen3_nvfp4"])
def test_streamed_equals_in_memory(scheme: str, stats) -> None:
    same_stats(stats(scheme, "quantized", True), stats(scheme, "quantized", False))


def test_scheme_recorded_as_in_config(models, stats) -> None:
    with Checkpoint(models("deepseek_fp8")[0]) as ckpt:
        scheme = scheme_for(ckpt)
    assert stats("deepseek_fp8", "quantized", False).calibration["quantization"] == \
        {"method": "fp8", "scheme": scheme.name} == {"method": "fp8", "scheme": "fp8 block [16, 24]"}


# ---------------------------------------------------------------------------------------------
# Downstream: prune --stats on the quantized checkpoint


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prune_by_stats_and_verify(scheme: str, models, stats, cli: Callable[..., Result], root: Path,
                                   tmp_path: Path) -> None:
    src = models(scheme)[0]
    stats_path = root / f"{scheme}-quantized-memory.safetensors"
    stats(scheme, "quantized", False)
    out = tmp_path / "pruned"
    result = cli("prune", src, "--stats", stats_path, "--criterion", "reap", "--ratio", "0.25", "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0
    with Checkpoint(src) as s, Checkpoint(out) as o:
        assert o.config["quantization_config"] == s.config["quantization_config"]
        assert {o.info(n).dtype for n in o.names()} == {s.info(n).dtype for n in s.names()}
    # the pruned quantized checkpoint loads dequantized and runs
    model = load_model(out, "cpu", torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# Bad input


SCALE = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"


@pytest.mark.parametrize("streamed", [False, True], ids=["memory", "streamed"])
def test_missing_scale_is_one_line_exit_2_nothing_written(streamed: bool, models, data_file: Path,
                                                          cli: Callable[..., Result], tmp_path: Path) -> None:
    config, tensors = _load(models("deepseek_fp8")[0])
    tensors.pop(SCALE)
    bad = _tokenizer(_save(tmp_path / "bad", config, tensors))
    out = tmp_path / "stats.safetensors"
    args = ["collect", bad, "-d", data_file, "-o", out, "--samples", "2", "--seq-len", "16", "--device", "cpu",
            "--dtype", "float32"] + (["--stream-layers"] if streamed else [])
    result = cli(*args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip() if result.stderr_bytes is not None else result.output.strip()
    message = message.splitlines()[-1]  # after the progress bar
    assert message.startswith("Error: "), result.output
    for word in ("experts.3.up_proj.weight", SCALE, ".safetensors"):
        assert word in message, (word, message)
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
