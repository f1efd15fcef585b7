"""`sparsify -d DATA --method sparsegpt` and `--sequential` (MoE-Pruner's layer-wise procedure).

SparseGPT's batched OBS pass against the reference algorithm written out for one matrix; the
calibration pass's statistics against `collect` (one-shot: the same masks as `sparsify --stats`);
--sequential against `sparsify --stats` on statistics collected with the layers below already
sparsified; the CLI, N:M checked by `verify`, and the errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.cli import main
from surgery.collect.options import CollectOptions
from surgery.collect.run import collect
from surgery.refine.sparsify import check_nm, sparsify_checkpoint
from surgery.refine.sparsify.sequential import calibrated_sparsify
from surgery.refine.sparsify.sparsegpt import sparsegpt
from tiny_models import build_tiny, checkpoint_bytes, moe_layers
from tiny_tokenizer import save_tiny_tokenizer

WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7 ( ) , ;".split()
CALIB = CollectOptions(samples=6, seq_len=24, batch_size=3, seed=3, device="cpu", dtype="float32", progress=False)


def reference_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                        blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """IST-DASLab/sparsegpt's SparseGPT.fasterprune for one [rows, cols] matrix, written out (float64)."""
    w, h = w.clone().double(), h.clone().double()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, q1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype), torch.zeros(rows, i2 - i1,
                                                                                                  dtype=w.dtype)
        hinv1 = hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = w1**2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = w1[:, i:i + prunem] ** 2 / (torch.diag(hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


@pytest.mark.parametrize(("pattern", "prunen"), [("unstructured", 0), ("2:4", 2)])
def test_sparsegpt_matches_the_reference(pattern: str, prunen: int) -> None:
    """Two experts at once, 160 inputs (two blocks, the second partial), against the reference per matrix.
    The reference's unstructured threshold keeps ties (<=); continuous random weights have none."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 12, 160, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 300, 160, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 160, dtype=torch.float64)
    h = x.transpose(1, 2) @ x
    h[1, 7, :] = h[1, :, 7] = 0  # a dead input of expert 1
    ours = sparsegpt(w, h, 0.5, pattern)
    for e in range(2):
        expected = reference_sparsegpt(w[e], h[e], 0.5, prunen, 4 if prunen else 0)
        torch.testing.assert_close(ours[e].double(), expected, rtol=1e-4, atol=1e-5)
    assert (ours == 0).double().mean() == pytest.approx(0.5, abs=0.01) and (ours[1, :, 7] == 0).all()
    masked = w.float() * (ours != 0)  # the same mask without the OBS update reconstructs X W^T worse
    err = lambda v: float(((x.float() @ (v - w.float()).transpose(1, 2)) ** 2).sum())  # noqa: E731
    assert err(ours) < err(masked)


def test_sparsegpt_unrouted_expert_is_pruned_by_magnitude() -> None:
    w = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    ours = sparsegpt(w, torch.zeros(1, 8, 8), 0.5, "unstructured")
    kept = ours != 0
    assert kept.sum() == 15 and torch.equal(ours[kept], w[kept])  # no update; as the reference, int(32 * 0.5) + 1 pruned
    assert w[kept].abs().min() >= w[~kept].abs().max()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sparsify-calibrated")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    rng = random.Random(11)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(60)]
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def model(root: Path) -> Path:
    path = build_tiny("qwen3_moe", root / "model", layout="fused")  # MoE layers 0 and 2, a dense layer between
    save_tiny_tokenizer(path, vocab_size=128)
    return path


def _expert_tensors(folder: Path, layer: int) -> dict[str, bytes]:
    return {n: v[2] for n, v in checkpoint_bytes(folder).items() if f"layers.{layer}.mlp.experts." in n}


def _by_stats(src: Path, stats: Path, out: Path) -> Path:
    sparsify_checkpoint(src, stats, out, sparsity=0.5, method="moe-pruner")
    return out


def test_one_shot_pass_gives_the_masks_of_collect(model: Path, data: Path, root: Path) -> None:
    """Without --sequential the calibration pass sums what `collect` sums: the same output as --stats."""
    stats = root / "stats.safetensors"
    collect(model, [str(data)], stats, CollectOptions(**{**CALIB.__dict__, "holdout": 0}))
    ours = root / "one-shot"
    calibrated_sparsify(model, [str(data)], ours, calibration=CALIB, sequential=False, sparsity=0.5)
    assert checkpoint_bytes(ours) == checkpoint_bytes(_by_stats(model, stats, root / "by-stats"))


def _with_layer_from(original: Path, donor: Path, layer: int, out: Path) -> Path:
    """`original` with `layer`'s expert tensors taken from `donor`."""
    shutil.copytree(original, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        donor_tensors = {k: v for f in donor.glob("*.safetensors") for k, v in load_file(f).items()}
        tensors.update({k: donor_tensors[k] for k in tensors if f"layers.{layer}.mlp.experts." in k})
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_sequential_scores_each_layer_after_the_layers_below(model: Path, data: Path, root: Path) -> None:
    first, second = moe_layers(model)
    seq = root / "sequential"
    section = calibrated_sparsify(model, [str(data)], seq, calibration=CALIB, sequential=True, sparsity=0.5)
    assert section["sequential"] and section["achieved"] == pytest.approx(0.5, abs=0.01)
    one_shot = root / "one-shot-2"
    calibrated_sparsify(model, [str(data)], one_shot, calibration=CALIB, sequential=False, sparsity=0.5)
    assert _expert_tensors(seq, first) == _expert_tensors(one_shot, first)  # same inputs below the first
    assert _expert_tensors(seq, second) != _expert_tensors(one_shot, second)
    # by hand: statistics collected on the model whose first MoE layer is already sparsified
    partly = _with_layer_from(model, seq, first, root / "first-sparsified")
    stats = root / "stats-after-first.safetensors"
    collect(partly, [str(data)], stats, CollectOptions(**{**CALIB.__dict__, "holdout": 0}))
    by_hand = _by_stats(partly, stats, root / "by-hand")
    assert _expert_tensors(seq, second) == _expert_tensors(by_hand, second)


def test_cli_sparsegpt_two_four(model: Path, data: Path, root: Path, cli) -> None:
    out = root / "cli-sparsegpt"
    result = cli("sparsify", model, "-d", data, "-o", out, "--method", "sparsegpt", "--pattern", "2:4", "--sequential",
                 "--samples", "6", "--seq-len", "24", "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "pruning.json").read_text())["sparsity"]
    assert doc["method"] == "sparsegpt" and doc["sequential"] and doc["calibration"]["samples"] == 6
    assert doc["achieved"] == pytest.approx(0.5) and check_nm(out) == []
    assert cli("verify", out).exit_code == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the pass's spill folder went with it


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "sparsegpt", "--sparsity", "0.5"], "pass -d DATA"),
    (["--method", "wanda", "--sparsity", "0.5", "-d", "DATA"], "-d DATA goes with --sequential"),
    (["--sequential", "--method", "magnitude", "--sparsity", "0.5", "-d", "DATA"], "does not read calibration text"),
])
def test_cli_errors(args: list[str], message: str, model: Path, data: Path, root: Path, cli) -> None:
    out = root / "refused"
    result = cli("sparsify", model, "-o", out, *[str(data) if a == "DATA" else a for a in args], "--device", "cpu")
    assert result.exit_code == 2 and message in result.output and not out.exists(), result.output


def test_stats_without_removal_is_refused(model: Path, data: Path, root: Path, cli) -> None:
    result = cli("sparsify", model, "-o", root / "no-stats", "--sequential", "--sparsity", "0.5", "-d", data,
                 "--stats", data, "--device", "cpu")
    assert result.exit_code == 2 and "--stats is read only with --criterion" in result.output
