"""`sparsify` on quantized checkpoints (FP8 block/channel/tensor, NVFP4, MXFP4) keeps the format: the same
tensors, dtypes and shapes, every scale byte for byte, pruned values' codes zeroed; the result, dequantized,
equals sparsifying the dequantized float32 copy, so scores come from dequantized values and N:M holds after
dequantization."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import Result

from quantized_models import BUILDERS, _load, _save, dequantized_copy, reference_dequantized
from tiny_models import checkpoint_bytes
from tiny_tokenizer import save_tiny_tokenizer

from stats_formats import StatsFile
from surgery.collect.run import collect
from surgery.io import Checkpoint
from surgery.io.quantization import dequantize
from surgery.refine.sparsify import check_nm, row_mask, sparsify_checkpoint

SCHEMES = list(BUILDERS)
PATTERNS = {"unstructured": 0.5, "2:4": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """`models(scheme)`: (the quantized checkpoint, its dequantized float32 copy), built once."""
    root = tmp_path_factory.mktemp("sparsify-quantized")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(scheme: str) -> tuple[Path, Path]:
        if scheme not in cache:
            q = BUILDERS[scheme](root / scheme)
            cache[scheme] = q, dequantized_copy(q, root / f"{scheme}-dequantized")
        return cache[scheme]

    return get


def _sparsify(src: Path, out: Path, pattern: str, method: str = "magnitude", stats: Path | None = None) -> dict:
    return sparsify_checkpoint(src, stats, out, sparsity=PATTERNS.get(pattern), pattern=pattern, method=method,
                               include_shared=True)


def _nm_groups(values: torch.Tensor, input_axis: int, m: int) -> torch.Tensor:
    """Non-zeros in every group of m consecutive inputs."""
    v = values.movedim(input_axis, -1)
    return (v.reshape(-1, m) != 0).sum(-1)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sparsify_keeps_format_and_equals_the_dequantized_copy_sparsified(scheme: str, pattern: str, models,
                                                                         tmp_path: Path) -> None:
    q, d = models(scheme)
    section = _sparsify(q, tmp_path / "q", pattern)
    _sparsify(d, tmp_path / "d", pattern)
    before, after = checkpoint_bytes(q), checkpoint_bytes(tmp_path / "q")
    assert {n: v[:2] for n, v in after.items()} == {n: v[:2] for n, v in before.items()}  # names, dtypes, shapes
    targets = set(section["tensors"])
    assert targets and all(after[n][2] != before[n][2] for n in targets)
    untouched = [n for n in before if n not in targets]
    assert any(n.endswith(("_scale_inv", "_scale", "_scales", "_global_scale")) for n in untouched)
    for name in untouched:  # every scale (and everything else) byte for byte
        assert after[name][2] == before[name][2], name
    assert json.loads((tmp_path / "q" / "config.json").read_text()) == json.loads((q / "config.json").read_text())
    assert section["achieved"] >= 0.5

    got, want = reference_dequantized(tmp_path / "q"), _load(tmp_path / "d")[1]
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    if pattern == "2:4":
        for name, entry in section["tensors"].items():
            with Checkpoint(tmp_path / "q") as ckpt:
                values = torch.from_numpy(dequantize(ckpt, name))
            assert int(_nm_groups(values, entry["input_axis"], 4).max()) <= 2, name
        assert check_nm(tmp_path / "q") == []


def test_nm_check_reads_quantized_codes(models, tmp_path: Path) -> None:
    """verify's N:M check dequantizes: a pruned FP8 code set back to non-zero is reported."""
    q, _ = models("deepseek_fp8")
    out = tmp_path / "out"
    section = _sparsify(q, out, "2:4")
    name = next(n for n in section["tensors"] if "experts.1.down_proj" in n)
    config, tensors = _load(out)
    codes = tensors[name].view(torch.uint8)
    zero = torch.nonzero(codes[0, :4] == 0)[0].item()
    codes[0, zero] = 0x38  # e4m3 1.0
    broken = _save(tmp_path / "broken", config, tensors)
    shutil.copy(out / "pruning.json", broken / "pruning.json")
    problems = check_nm(broken)
    assert len(problems) == 1 and name in problems[0] and "more than 2 non-zeros" in problems[0]


@pytest.mark.parametrize("scheme", ["deepseek_fp8", "gpt_oss_mxfp4", "qwen3_nvfp4"])
def test_moe_pruner_scores_dequantized_values(scheme: str, models, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """With statistics: each pruned matrix is exactly its dequantized values masked by row_mask(values, norms)."""
    q, _ = models(scheme)
    vocab = json.loads((q / "config.json").read_text()).get("vocab_size") or 128
    save_tiny_tokenizer(q, vocab_size=min(256, vocab))
    rng = random.Random(5)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice("a b c expert 7 the .".split())
                                                         for _ in range(20))}) + "\n" for _ in range(8)))
    stats = tmp_path / "stats.safetensors"
    collect(q, [str(data)], stats, samples=4, seq_len=16, holdout=0, batch_size=2, device="cpu", dtype="float32",
            progress=False)
    out = tmp_path / "out"
    result = cli("sparsify", q, "--stats", stats, "--method", "moe-pruner", "--pattern", "2:4", "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0
    section = json.loads((out / "pruning.json").read_text())["sparsity"]
    sf = StatsFile(stats)
    differs = False
    with Checkpoint(q) as src, Checkpoint(out) as dst:
        for name, entry in section["tensors"].items():
            if entry["score"] != "moe-pruner":
                continue
            fused = len(dst.info(name).shape) > (3 if name.endswith("_blocks") else 2)
            layer = int(name.split(".layers.")[1].split(".")[0])
            field = "inter_gsq_sum" if "down_proj" in name else "in_gsq_sum"
            for i in range(dst.info(name).shape[0] if fused else 1):
                expert = i if fused else int(name.split(".experts.")[1].split(".")[0])
                w = dequantize(src, name, i if fused else None)
                norm = np.sqrt(np.asarray(sf.get(layer, field))[expert])
                norm = norm if norm.any() else None  # never routed in calibration: magnitude
                keep = row_mask(w, norm, 0.5, "2:4")
                assert np.array_equal(dequantize(dst, name, i if fused else None), np.where(keep, w, 0)), name
                differs |= not np.array_equal(keep, row_mask(w, None, 0.5, "2:4"))
    assert differs, "the statistics must change some masks compared with magnitude"
