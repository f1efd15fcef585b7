"""Weight sparsity inside experts: exact masks, N:M groups, per-row counts, streaming, statistics
mapping after expert removal, dtypes, and checkpoints that still load in transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import surgery.io.writer as writer
import surgery.refine.sparsify as sp
from stats_formats import StatsFile, tensor_name
from stats_factory import default_calibration, default_model, make_stats
from surgery.architectures import resolve
from surgery.errors import CheckpointError, UserError
from surgery.io.expert_weights import read_expert
from surgery.io.identity import router_sha256
from surgery.io import Checkpoint, SafetensorsFile, provenance
from surgery.refine.sparsify import SparsifyError, check_nm, check_sparsity, parse_pattern, row_mask, sparsify_checkpoint
from tiny_models import checkpoint_bytes, read_header, write_checkpoint

# ---------------------------------------------------------------------------------------------
# Helpers


def reference_keep(w: np.ndarray, norm: np.ndarray | None, sparsity: float, pattern: str) -> np.ndarray:
    """Keep-mask by a full stable sort of each row (or each N:M group): lowest scores go first."""
    score = np.abs(w.astype(np.float32))
    if norm is not None:
        score = score * norm.astype(np.float32)[None, :]
    if pattern == "unstructured":
        groups, drop = score[:, None, :], math.floor(sparsity * w.shape[1] + 0.5)
    else:
        n, m = (int(x) for x in pattern.split(":"))
        groups, drop = score.reshape(w.shape[0], -1, m), m - n
    order = np.argsort(groups, axis=-1, kind="stable")[..., :drop]
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, False, axis=-1)
    return keep.reshape(w.shape)


def make_stats_file(model_dir: Path, path: Path, overrides: dict[tuple[int, str], np.ndarray] | None = None,
                    seed: int = 0) -> Path:
    """A valid statistics file for `model_dir` (its router hash and dimensions), some fields replaced."""
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names())
    first = next(iter(layout.layers))
    inter, hidden = read_expert(ckpt, layout, first, 0)["gate"].shape
    model = default_model(num_experts=layout.num_experts, hidden=hidden, inter=inter, layers=tuple(layout.layers),
                          top_k=layout.top_k)
    model.update(model_type=layout.spec.model_type, router_sha256=router_sha256(ckpt, layout))
    ckpt.close()
    tensors = make_stats(model, 64, seed)
    for (layer, field), value in (overrides or {}).items():
        tensors[tensor_name(layer, field)] = np.asarray(value, dtype=np.float64)
    StatsFile.from_arrays(model, default_calibration(64), tensors).save(path)
    return path


QWEN_CONFIG = {"model_type": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 1, "num_hidden_layers": 1}
H, I = 8, 4  # hand-made experts: hidden size, intermediate size


def hand_model(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A one-layer, two-expert qwen3_moe checkpoint over two shards, with attention-like extra tensors."""
    g = torch.Generator().manual_seed(seed)
    experts = {}
    for e in range(2):
        p = f"model.layers.0.mlp.experts.{e}."
        experts[p + "gate_proj.weight"] = torch.randn(I, H, generator=g).to(dtype)
        experts[p + "up_proj.weight"] = torch.randn(I, H, generator=g).to(dtype)
        experts[p + "down_proj.weight"] = torch.randn(H, I, generator=g).to(dtype)
    other = {
        "model.layers.0.mlp.gate.weight": torch.randn(2, H, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=g).to(dtype),
        "model.embed_tokens.weight": torch.randn(16, H, generator=g).to(dtype),
    }
    return write_checkpoint(path, QWEN_CONFIG, [other, experts])


def raw_array(path: Path, name: str) -> tuple[np.ndarray, str]:
    """A tensor's stored bits (unsigned integers of its width) and its dtype."""
    dtype, shape, raw = checkpoint_bytes(path)[name]
    return np.frombuffer(raw, dtype=sp.BITS_DTYPES[dtype]).reshape(shape), dtype


def values(path: Path, name: str) -> np.ndarray:
    ckpt = Checkpoint(path)
    try:
        return np.array(ckpt.array(name), dtype=np.float32)
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------
# Masks on hand-made matrices


W = np.array([[1.0, -2.0, 3.0, -4.0], [0.5, 4.0, -1.0, 2.0]], dtype=np.float32)
NORM = np.sqrt(np.array([16.0, 1.0, 1.0, 0.25]))  # channel norms 4, 1, 1, 0.5


def test_row_mask_scores_by_weight_times_channel_norm() -> None:
    # scores: row 0 = [4, 2, 3, 2], row 1 = [2, 4, 1, 1]
    assert row_mask(W, NORM, 0.5, "unstructured").tolist() == [[True, False, True, False], [True, True, False, False]]
    # magnitude: row 0 = [1, 2, 3, 4], row 1 = [0.5, 4, 1, 2]
    assert row_mask(W, None, 0.5, "unstructured").tolist() == [[False, False, True, True], [False, True, False, True]]
    # one per row; row 0 ties at 2 between inputs 1 and 3: the lower index goes
    assert row_mask(W, NORM, 0.25, "unstructured").tolist() == [[True, False, True, True], [True, True, False, True]]
    assert row_mask(W, NORM, 0.0, "unstructured").all()


def test_row_mask_n_m_groups_differ_from_unstructured() -> None:
    w = np.array([[1, 2, 3, 4, 8, 7, 6, 5]], dtype=np.float32)
    norm = np.array([4, 1, 1, 1, 1, 1, 1, 8], dtype=np.float64)  # scores [4, 2, 3, 4, 8, 7, 6, 40]
    assert row_mask(w, norm, 0.5, "2:4").tolist() == [[True, False, False, True, True, False, False, True]]
    assert row_mask(w, norm, 0.5, "unstructured").tolist() == [[False] * 4 + [True] * 4]
    assert row_mask(w, None, 0.5, "2:4").tolist() == [[False, False, True, True, True, True, False, False]]
    assert row_mask(w, None, 0.75, "1:4").tolist() == [[False, False, False, True, True, False, False, False]]
    assert row_mask(w, norm, 0.5, "4:8").tolist() == row_mask(w, norm, 0.5, "unstructured").tolist()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_n_m_holds_on_every_group(pattern: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    norm = rng.uniform(0.0, 3.0, size=96)
    n, m = parse_pattern(pattern)
    keep = row_mask(w, norm, 1 - n / m, pattern)
    assert (keep.reshape(64, -1, m).sum(axis=-1) == n).all()
    assert (keep == reference_keep(w, norm, 1 - n / m, pattern)).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("cols", [96, 33])
def test_unstructured_is_within_one_element_of_target_per_row(sparsity: float, cols: int) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(40, cols)).astype(np.float32)
    norm = rng.uniform(0.0, 3.0, size=cols)
    keep = row_mask(w, norm, sparsity, "unstructured")
    pruned = (~keep).sum(axis=1)
    assert (np.abs(pruned - sparsity * cols) <= 1).all()
    assert len(set(pruned.tolist())) == 1  # the same count in every row
    score = np.abs(w) * norm.astype(np.float32)
    assert (np.where(~keep, score, -np.inf).max(axis=1) <= np.where(keep, score, np.inf).min(axis=1)).all()


def test_ties_break_like_a_stable_sort() -> None:
    rng = np.random.default_rng(3)
    w = rng.integers(-3, 4, size=(50, 16)).astype(np.float32)  # many equal magnitudes, zeros included
    for sparsity in (0.25, 0.5, 0.75):
        assert (row_mask(w, None, sparsity, "unstructured") == reference_keep(w, None, sparsity, "unstructured")).all()
    assert (row_mask(w, None, 0.5, "2:4") == reference_keep(w, None, 0.5, "2:4")).all()


@pytest.mark.parametrize("pattern", ["3:2", "0:4", "4:4", "2-4", "two:four", "structured"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(SparsifyError, match="pattern"):
        parse_pattern(pattern)


def test_sparsity_must_agree_with_pattern() -> None:
    assert check_sparsity(None, "2:4") == 0.5
    assert check_sparsity(0.5, "2:4") == 0.5
    assert check_sparsity(None, "1:4") == 0.75
    with pytest.raises(SparsifyError, match="2:4 means sparsity 0.5"):
        check_sparsity(0.3, "2:4")
    for bad in (None, 1.0, -0.1):
        with pytest.raises(SparsifyError, match="unstructured sparsity"):
            check_sparsity(bad, "unstructured")
    with pytest.raises(SparsifyError, match="not a multiple of 4"):
        row_mask(np.ones((2, 6), np.float32), None, 0.5, "2:4")
    with pytest.raises(SparsifyError, match="channel norms"):
        row_mask(np.ones((2, 4), np.float32), np.ones(3), 0.5, "unstructured")


# ---------------------------------------------------------------------------------------------
# Checkpoints: exact masks from hand-made statistics, kept bits, copied bytes


def hand_overrides() -> dict[tuple[int, str], np.ndarray]:
    """Router-weighted and plain sums that disagree, so choosing the wrong field changes the masks."""
    rng = np.random.default_rng(4)
    return {(0, f): rng.uniform(0.0, 10.0, size=(2, H if f.startswith("in_") else I)) ** 2
            for f in ("in_sq_sum", "in_gsq_sum", "inter_sq_sum", "inter_gsq_sum")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["moe-pruner", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_exact_masks_and_kept_bits(tmp_path: Path, dtype: torch.dtype, method: str, pattern: str) -> None:
    src = hand_model(tmp_path / "src", dtype)
    stats = make_stats_file(src, tmp_path / "stats.safetensors", hand_overrides())
    out = tmp_path / "out"
    section = sparsify_checkpoint(src, None if method == "magnitude" else stats, out, sparsity=0.5, pattern=pattern,
                                  method=method)
    sums = StatsFile(stats)
    field = {"moe-pruner": "gsq_sum", "wanda": "sq_sum"}.get(method)
    before, after = checkpoint_bytes(src), checkpoint_bytes(out)
    assert set(before) == set(after)
    masked = set()
    for e in range(2):
        for role, side in (("gate", "in"), ("up", "in"), ("down", "inter")):
            name = f"model.layers.0.mlp.experts.{e}.{role}_proj.weight"
            norm = None if field is None else np.sqrt(sums.get(0, f"{side}_{field}")[e])
            keep = reference_keep(values(src, name), norm, 0.5, pattern)
            old, stored = raw_array(src, name)
            new, _ = raw_array(out, name)
            assert stored == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
            assert (new == np.where(keep, old, 0)).all(), name  # kept bits unchanged, pruned ones +0
            assert section["tensors"][name] == {"achieved": 0.5, "input_axis": 1, "score": method}
            masked.add(name)
    for name in set(before) - masked:
        assert before[name] == after[name], name  # attention, router, embeddings: same bytes
    assert section["achieved"] == 0.5
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").read_bytes() == (src / "model.safetensors.index.json").read_bytes()
    doc = json.loads((out / "pruning.json").read_text())
    assert doc["sparsity"]["method"] == method and doc["sparsity"]["pattern"] == pattern
    assert doc["sparsity"]["sparsity"] == 0.5 and doc["source"]["path"] == str(src.resolve())


def test_moe_pruner_and_wanda_masks_differ_on_these_statistics(tmp_path: Path) -> None:
    """Guards the test above: with equal masks it could not tell the two fields apart."""
    src = hand_model(tmp_path / "src")
    stats = make_stats_file(src, tmp_path / "stats.safetensors", hand_overrides())
    sparsify_checkpoint(src, stats, tmp_path / "a", sparsity=0.5, method="moe-pruner")
    sparsify_checkpoint(src, stats, tmp_path / "b", sparsity=0.5, method="wanda")
    a, b = checkpoint_bytes(tmp_path / "a"), checkpoint_bytes(tmp_path / "b")
    for role in ("gate", "up", "down"):
        name = f"model.layers.0.mlp.experts.0.{role}_proj.weight"
        assert a[name] != b[name]


def test_expert_never_routed_falls_back_to_magnitude(tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    overrides = hand_overrides()
    for key in overrides:
        overrides[key][1] = 0.0  # expert 1 saw no calibration token
    stats = make_stats_file(src, tmp_path / "stats.safetensors", overrides)
    section = sparsify_checkpoint(src, stats, tmp_path / "out", sparsity=0.5)
    assert section["unrouted_experts_magnitude"] == {"0": [1]}
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    keep = reference_keep(values(src, name), None, 0.5, "unstructured")
    assert (values(tmp_path / "out", name) == np.where(keep, values(src, name), 0)).all()


# ---------------------------------------------------------------------------------------------
# Every layout: per-expert and fused, [out, in] and [in, out], halves and interleaved gate/up

LAYOUT_CASES = [
    ("qwen3_moe", "per-expert"), ("qwen3_moe", "fused"), ("mixtral", "per-expert"),
    ("llama4_text", "fused"), ("gpt_oss", "fused"), ("granitemoe", "fused"),
]


@pytest.mark.parametrize("model_type,layout", LAYOUT_CASES, ids=[f"{m}-{l}" for m, l in LAYOUT_CASES])
def test_every_layout_masks_each_expert_matrix_by_rows(tiny, tmp_path: Path, model_type: str, layout: str) -> None:
    src = tiny(model_type, layout)
    stats = make_stats_file(src, tmp_path / "stats.safetensors", seed=5)
    out = tmp_path / "out"
    section = sparsify_checkpoint(src, stats, out, sparsity=None, pattern="2:4", method="moe-pruner")
    assert check_nm(out) == []
    sums = StatsFile(stats)
    a, b = Checkpoint(src), Checkpoint(out)
    lay = resolve(a.config, a.names())
    for layer in lay.layers:
        for e in range(lay.num_experts):
            old, new = read_expert(a, lay, layer, e), read_expert(b, lay, layer, e)
            for role, side in (("gate", "in_gsq_sum"), ("up", "in_gsq_sum"), ("down", "inter_gsq_sum")):
                norm = np.sqrt(sums.get(layer, side)[e])
                keep = reference_keep(old[role], norm if norm.any() else None, 0.5, "2:4")  # unrouted: magnitude
                assert (new[role] == np.where(keep, old[role], 0)).all(), (layer, e, role)
    before, after = checkpoint_bytes(src), checkpoint_bytes(out)
    for name in set(before) - set(section["tensors"]):
        assert before[name] == after[name], name  # routers, biases, attention, norms
    assert section["achieved"] == 0.5
    a.close()
    b.close()


def test_output_loads_in_transformers(tiny, tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "per-expert")
    stats = make_stats_file(src, tmp_path / "stats.safetensors")
    out = tmp_path / "out"
    section = sparsify_checkpoint(src, stats, out, sparsity=0.5, method="moe-pruner")
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    sparse = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    dense_params, sparse_params = dict(dense.named_parameters()), dict(sparse.named_parameters())
    zeros = total = 0
    for name, p in sparse_params.items():
        if ".mlp.experts." in name:
            zeros += int((p == 0).sum())
            total += p.numel()
        else:
            assert torch.equal(p, dense_params[name]), name
    assert total and zeros == round(section["achieved"] * total)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = sparse(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense(ids).logits)


# ---------------------------------------------------------------------------------------------
# Streaming: one expert matrix (or one slab of a fused tensor) in memory at a time


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_streams_one_expert_tensor_at_a_time(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             layout: str) -> None:
    src = tiny("qwen3_moe", layout)
    events: list[tuple[str, int]] = []
    read_range, write_all = SafetensorsFile.read_range, writer._write_all

    def traced_read(self: SafetensorsFile, begin: int, end: int) -> bytes:
        events.append(("read", end - begin))
        return read_range(self, begin, end)

    def traced_write(fd: int, data: bytes) -> None:
        events.append(("write", len(data)))
        write_all(fd, data)

    monkeypatch.setattr(SafetensorsFile, "read_range", traced_read)
    monkeypatch.setattr(writer, "_write_all", traced_write)
    section = sparsify_checkpoint(src, None, tmp_path / "out", sparsity=0.5, method="magnitude")
    ckpt = Checkpoint(src)
    infos = [ckpt.info(n) for n in section["tensors"]]
    ckpt.close()
    experts = [info.shape[0] if layout == "fused" else 1 for info in infos]
    one_expert = [info.nbytes // e for info, e in zip(infos, experts) for _ in range(e)]
    reads = [size for kind, size in events if kind == "read"]
    assert sorted(reads) == sorted(one_expert)  # each expert matrix read once, alone
    if layout == "fused":
        assert max(reads) < min(info.nbytes for info in infos)  # a fused tensor is never read whole
    for (kind, size), following in zip(events, events[1:]):
        if kind == "read":
            assert following == ("write", size)  # written before the next expert is read


# ---------------------------------------------------------------------------------------------
# N:M verification


def test_check_nm_finds_a_broken_group(tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    out = tmp_path / "out"
    sparsify_checkpoint(src, None, out, sparsity=None, pattern="2:4", method="magnitude")
    assert check_nm(out) == []
    name = "model.layers.0.mlp.experts.1.gate_proj.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    header, start = read_header(out / shard)
    begin = start + header[name]["data_offsets"][0]
    first_row = np.frombuffer((out / shard).read_bytes()[begin: begin + 4 * H], dtype="<f4")
    zero = int(np.flatnonzero(first_row == 0)[0])
    with open(out / shard, "r+b") as f:
        f.seek(begin + 4 * zero)
        f.write(np.float32(1.5).tobytes())
    problems = check_nm(out)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: 1 of 8 groups of 4 consecutive inputs")


def test_check_nm_ignores_unstructured_and_plain_checkpoints(tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    assert check_nm(src) == []
    sparsify_checkpoint(src, None, tmp_path / "out", sparsity=0.6, method="magnitude")
    assert check_nm(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------
# Refusals


def test_fp8_experts_without_quantization_config_are_refused(tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = {n: torch.from_numpy(values(src, n)) for n in read_header(src / shard)[0]}
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, src / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight' is F8_E4M3, but .*no quantization_config"):
        sparsify_checkpoint(src, None, tmp_path / "out", sparsity=0.5, method="magnitude")
    assert not (tmp_path / "out").exists()


def test_mxfp4_experts_without_quantization_config_are_refused(tmp_path: Path) -> None:
    config = {"model_type": "gpt_oss", "num_local_experts": 2, "num_experts_per_tok": 1, "num_hidden_layers": 1}
    p = "model.layers.0.mlp."
    tensors = {
        p + "router.weight": torch.zeros(2, 8), p + "router.bias": torch.zeros(2),
        p + "experts.gate_up_proj_blocks": torch.zeros(2, 8, 1, 16, dtype=torch.uint8),
        p + "experts.gate_up_proj_scales": torch.zeros(2, 8, 1, dtype=torch.uint8),
        p + "experts.down_proj_blocks": torch.zeros(2, 8, 1, 16, dtype=torch.uint8),
        p + "experts.down_proj_scales": torch.zeros(2, 8, 1, dtype=torch.uint8),
    }
    src = write_checkpoint(tmp_path / "src", config, [tensors])
    with pytest.raises(CheckpointError, match="holds MXFP4 blocks, but .*no quantization_config"):
        sparsify_checkpoint(src, None, tmp_path / "out", sparsity=0.5, method="magnitude")
    assert not (tmp_path / "out").exists()


def test_statistics_are_checked(tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    other = hand_model(tmp_path / "other", seed=1)
    stats = make_stats_file(other, tmp_path / "stats.safetensors")
    with pytest.raises(UserError, match="collected on a different model"):
        sparsify_checkpoint(src, stats, tmp_path / "out", sparsity=0.5, method="wanda")
    with pytest.raises(SparsifyError, match="needs a statistics file"):
        sparsify_checkpoint(src, None, tmp_path / "out", sparsity=0.5, method="moe-pruner")
    with pytest.raises(SparsifyError, match="reads no statistics"):
        sparsify_checkpoint(src, stats, tmp_path / "out", sparsity=0.5, method="magnitude")
    with pytest.raises(CheckpointError, match="must differ"):
        sparsify_checkpoint(src, None, src, sparsity=0.5, method="magnitude", overwrite=True)


def test_cli_errors_are_one_line(cli, tmp_path: Path) -> None:
    src = hand_model(tmp_path / "src")
    cases = [
        (["--pattern", "2:4", "--sparsity", "0.3"], "pattern 2:4 means sparsity 0.5"),
        (["--pattern", "5:4"], "pattern '5:4'"),
        (["--sparsity", "0.5", "--method", "wanda"], "needs a statistics file"),
        (["--sparsity", "0.5", "--criterion", "frequency"], "--remove-ratio and --criterion go together"),
    ]
    for args, message in cases:
        result = cli("sparsify", src, "-o", tmp_path / "out", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Combined with expert removal: statistics of the original model mapped to the kept experts


def skewed_stats(model_dir: Path, path: Path) -> Path:
    """Statistics whose experts differ a lot, so a wrong expert mapping changes the masks."""
    rng = np.random.default_rng(6)
    overrides = {}
    for layer in (0, 2):
        for f, size in (("in_gsq_sum", 32), ("inter_gsq_sum", 32)):
            overrides[layer, f] = rng.uniform(0.0, 5.0, size=(8, size)) ** 4
    return make_stats_file(model_dir, path, overrides, seed=7)


def test_one_command_removes_experts_then_maps_statistics(tiny, cli, tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "per-expert")
    stats = skewed_stats(src, tmp_path / "stats.safetensors")
    out = tmp_path / "out"
    result = cli("sparsify", src, "--stats", stats, "--remove-ratio", "0.5", "--criterion", "frequency",
                 "--pattern", "2:4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "50.0% of the weights in 24 expert tensors (2 MoE layers) are now zero (moe-pruner, 2:4)" in result.stdout
    doc = provenance.read(out)
    keep = provenance.expert_map(doc, out)
    assert doc["num_experts_after"] == 4 and doc["sparsity"]["stats_expert_ids"] == "pruning.json expert_map"
    assert any(ids != list(range(4)) for ids in keep.values())
    assert not list(tmp_path.glob(".out.*")) and not (out / "pruned").exists()  # the pruned checkpoint is gone
    sums = StatsFile(stats)
    a, b = Checkpoint(src), Checkpoint(out)
    la, lb = resolve(a.config, a.names()), resolve(b.config, b.names())
    differs = False
    for layer, ids in keep.items():
        for new, old in enumerate(ids):
            before, after = read_expert(a, la, layer, old), read_expert(b, lb, layer, new)
            for role, field in (("gate", "in_gsq_sum"), ("up", "in_gsq_sum"), ("down", "inter_gsq_sum")):
                keep_mask = reference_keep(before[role], np.sqrt(sums.get(layer, field)[old]), 0.5, "2:4")
                assert (after[role] == np.where(keep_mask, before[role], 0)).all(), (layer, new, role)
                wrong = reference_keep(before[role], np.sqrt(sums.get(layer, field)[new]), 0.5, "2:4")
                differs |= bool((wrong != keep_mask).any())
    assert differs  # the identity mapping would have given other masks
    assert check_nm(out) == []
    a.close()
    b.close()


def test_an_existing_output_is_refused_before_experts_are_removed(tiny, cli, tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "per-expert")
    stats = skewed_stats(src, tmp_path / "stats.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ("sparsify", src, "--stats", stats, "--remove-ratio", "0.5", "--criterion", "frequency",
            "--sparsity", "0.5", "-o", out)
    result = cli(*args)
    assert result.exit_code == 2 and "output folder already exists (use --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stats.safetensors"]  # nothing written beside it
    assert cli(*args, "--overwrite").exit_code == 0
    assert not (out / "notes.txt").exists() and not (out / "pruned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stats.safetensors"]


def test_prune_then_sparsify_equals_one_command(tiny, cli, tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "fused")
    stats = skewed_stats(src, tmp_path / "stats.safetensors")
    one = tmp_path / "one"
    assert cli("sparsify", src, "--stats", stats, "--remove-ratio", "0.5", "--criterion", "frequency",
               "--sparsity", "0.5", "-o", one).exit_code == 0
    pruned, two = tmp_path / "pruned", tmp_path / "two"
    prune = cli("prune", src, "--stats", stats, "--criterion", "frequency", "--ratio", "0.5", "-o", pruned)
    assert prune.exit_code == 0, prune.output
    result = cli("sparsify", pruned, "--stats", stats, "--sparsity", "0.5", "-o", two)
    assert result.exit_code == 0, result.output
    assert checkpoint_bytes(one) == checkpoint_bytes(two)


def test_stale_or_missing_prune_source_is_refused(tiny, cli, tmp_path: Path) -> None:
    src = tiny("qwen3_moe", "per-expert")
    stats = skewed_stats(src, tmp_path / "stats.safetensors")
    pruned = tmp_path / "pruned"
    prune = cli("prune", src, "--stats", stats, "--criterion", "frequency", "--ratio", "0.5", "-o", pruned)
    assert prune.exit_code == 0, prune.output
    doc = json.loads((pruned / "pruning.json").read_text())
    stale = json.loads(json.dumps(doc))
    first = next(iter(stale["expert_map"]))
    stale["expert_map"][first] = stale["expert_map"][first][::-1]
    (pruned / "pruning.json").write_text(json.dumps(stale))
    with pytest.raises(SparsifyError, match="is not the kept rows of"):
        sparsify_checkpoint(pruned, stats, tmp_path / "out", sparsity=0.5)
    doc["source"]["path"] = str(tmp_path / "gone")
    (pruned / "pruning.json").write_text(json.dumps(doc))
    with pytest.raises(SparsifyError, match="neither on"):
        sparsify_checkpoint(pruned, stats, tmp_path / "out", sparsity=0.5)


# ---------------------------------------------------------------------------------------------
# Shared experts


def test_shared_experts_only_with_include_shared(tiny, tmp_path: Path) -> None:
    src = tiny("qwen2_moe", "per-expert")
    stats = make_stats_file(src, tmp_path / "stats.safetensors")
    plain = sparsify_checkpoint(src, stats, tmp_path / "plain", sparsity=0.5)
    shared = sparsify_checkpoint(src, stats, tmp_path / "shared", sparsity=0.5, include_shared=True)
    before = checkpoint_bytes(src)
    names = [n for n in before if ".shared_expert." in n and n.endswith("proj.weight")]
    assert len(names) == 6 and not set(names) & set(plain["tensors"])
    plain_bytes = checkpoint_bytes(tmp_path / "plain")
    sums = StatsFile(stats)
    for name in names:
        assert plain_bytes[name] == before[name]
        layer = int(name.split(".")[2])
        w = values(src, name)
        if "down_proj" in name:
            norm, score = None, "magnitude"
        else:
            norm, score = np.sqrt(sums.get(layer, "in_sq_sum").sum(axis=0)), "wanda"
        keep = reference_keep(w, norm, 0.5, "unstructured")
        assert (values(tmp_path / "shared", name) == np.where(keep, w, 0)).all(), name
        assert shared["tensors"][name]["score"] == score
