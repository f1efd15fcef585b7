"""`prune --merge` (hc-smoe, mc-smoe, lsq), `prune --refit` and `auto` by the real loss (issue 23): each merge
against a direct implementation, identical experts merge exactly, merged checkpoints load and run with the
merged values in place, the merging statistics are what they claim, refit lowers held-out block error, and
auto picks the lowest measured loss even where the reconstruction proxy prefers another plan."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stats_formats import StatsFile
from surgery.collect.run import collect
from surgery.criteria import rank_by_loss
from surgery.criteria.auto import holdout_error
from surgery.io import Checkpoint
from surgery.hub.model_card import update_card_eval
from surgery.io.expert_weights import read_expert
from surgery.model import load_model as load_novice_model
from surgery.pipeline import merge as pipeline_merge
from surgery.pipeline.auto_loss import candidate_loss, model_loss
from surgery.plan import Plan
from surgery.rewrite import merge as rewrite_merge
from surgery.rewrite.merge import merge_group, merge_layer
from surgery.rewrite.merge_groups import average_linkage, groups_for, mc_smoe_groups
from surgery.architectures import get_spec, resolve
from tiny_models import build_tiny, load_model, moe_blocks
from tiny_tokenizer import save_tiny_tokenizer

RUN = dict(samples=6, seq_len=24, holdout=2, batch_size=2, seed=3, progress=False)
KEEP = [0, 2, 3, 5, 6, 7]  # 6 of 8 experts


def _experts(rng: np.random.Generator, n: int, inter: int = 4, hidden: int = 5) -> list[dict[str, np.ndarray]]:
    return [{"gate": rng.normal(size=(inter, hidden)), "up": rng.normal(size=(inter, hidden)),
             "down": rng.normal(size=(hidden, inter))} for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Merge math against direct implementations


@pytest.mark.parametrize("method", rewrite_merge.METHODS)
def test_identical_experts_merge_exactly(method: str) -> None:
    rng = np.random.default_rng(0)
    one = _experts(rng, 1)[0]
    merged = merge_group(method, [one, dict(one), dict(one)], np.array([5.0, 2.0, 1.0]),
                         rng.random((3, 5)), rng.random((3, 4)))
    for role in one:
        assert np.array_equal(merged[role], one[role])


def test_hc_smoe_is_the_frequency_weighted_average() -> None:
    rng = np.random.default_rng(1)
    mats, freq = _experts(rng, 3), np.array([3.0, 1.0, 6.0])
    merged = merge_group("hc-smoe", mats, freq)
    for role in mats[0]:
        np.testing.assert_allclose(merged[role], np.average([m[role] for m in mats], axis=0, weights=freq), atol=1e-12)


def _best_permutation(rep: dict, member: dict) -> tuple[int, ...]:
    """Brute force: the neuron order of `member` with the largest summed dot products with `rep`'s neurons."""
    def score(p):
        return sum(rep["gate"][j] @ member["gate"][p[j]] + rep["up"][j] @ member["up"][p[j]]
                   + rep["down"][:, j] @ member["down"][:, p[j]] for j in range(len(p)))
    return max(itertools.permutations(range(rep["gate"].shape[0])), key=score)


def test_mc_smoe_aligns_neurons_then_averages() -> None:
    rng = np.random.default_rng(2)
    rep, member = _experts(rng, 2)
    perm = np.array(_best_permutation(rep, member))
    assert np.array_equal(rewrite_merge.align(rep, member), perm)
    freq = np.array([2.0, 3.0])
    merged = merge_group("mc-smoe", [rep, member], freq)
    np.testing.assert_allclose(merged["gate"], (2 * rep["gate"] + 3 * member["gate"][perm]) / 5, atol=1e-12)
    np.testing.assert_allclose(merged["down"], (2 * rep["down"] + 3 * member["down"][:, perm]) / 5, atol=1e-12)
    # a member that is the representative with its neurons shuffled is recognised exactly
    shuffled = {"gate": rep["gate"][[2, 0, 3, 1]], "up": rep["up"][[2, 0, 3, 1]], "down": rep["down"][:, [2, 0, 3, 1]]}
    again = merge_group("mc-smoe", [rep, shuffled], freq)
    for role in rep:
        np.testing.assert_allclose(again[role], rep[role], atol=1e-12)


def test_lsq_solves_the_diagonal_least_squares_problem() -> None:
    """Column c of the merged gate minimises sum_i D_i[c] ||w - W_i[:, c]||^2; solved here with lstsq."""
    rng = np.random.default_rng(3)
    rep, member = _experts(rng, 2)
    perm = rewrite_merge.align(rep, member)
    d_in, d_h = rng.random((2, 5)) + 0.1, rng.random((2, 4)) + 0.1
    merged = merge_group("lsq", [rep, member], np.array([1.0, 1.0]), d_in, d_h)
    aligned = [rep, rewrite_merge.permute(member, perm)]
    inter = [d_h[0], d_h[1][perm]]
    for c in range(5):
        a = np.concatenate([np.sqrt(d_in[i, c]) * np.eye(4) for i in range(2)])
        b = np.concatenate([np.sqrt(d_in[i, c]) * aligned[i]["gate"][:, c] for i in range(2)])
        np.testing.assert_allclose(merged["gate"][:, c], np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-10)
    for k in range(4):
        a = np.concatenate([np.sqrt(inter[i][k]) * np.eye(5) for i in range(2)])
        b = np.concatenate([np.sqrt(inter[i][k]) * aligned[i]["down"][:, k] for i in range(2)])
        np.testing.assert_allclose(merged["down"][:, k], np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-10)


def test_average_linkage_matches_scipy() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    points = np.random.default_rng(4).normal(size=(12, 3))
    for k in (2, 5, 9):
        ours = sorted(sorted(g) for g in average_linkage(points, k))
        labels = fcluster(linkage(points, method="average", metric="euclidean"), k, criterion="maxclust")
        theirs = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))
        assert ours == theirs


def test_mc_smoe_groups_by_router_logit_cosine() -> None:
    logits = np.random.default_rng(5).normal(size=(50, 6))
    freq = np.array([9.0, 1.0, 8.0, 2.0, 3.0, 7.0])
    groups = mc_smoe_groups(logits.T @ logits, freq, 3)
    assert [g[0] for g in groups] == [0, 2, 5]  # the three most used experts dominate
    unit = logits / np.linalg.norm(logits, axis=0)
    for g in groups:
        for other in g[1:]:
            assert g[0] == [0, 2, 5][int(np.argmax((unit.T @ unit)[other, [0, 2, 5]]))]


def test_cli_methods_are_the_rewrite_methods() -> None:
    assert pipeline_merge.METHODS == rewrite_merge.METHODS


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    rng = random.Random(7)
    words = "expert router token layer prune gate weight sparse dense mixture the a and 42 7 ( ) , ; fox".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) for _ in range(80)]
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _model_and_stats(root: Path, data_file: Path, layout: str) -> tuple[Path, Path]:
    path = build_tiny("qwen3_moe", root / layout, layout=layout)
    save_tiny_tokenizer(path, vocab_size=128)
    stats = root / f"{layout}.stats.safetensors"
    collect(path, [str(data_file)], stats, merge_stats=True, **RUN)
    return path, stats


@pytest.fixture(scope="module")
def model_and_stats(root: Path, data_file: Path) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE with fused experts on disk and its statistics (merging fields included)."""
    return _model_and_stats(root, data_file, "fused")


@pytest.fixture(scope="module")
def per_expert(root: Path, data_file: Path) -> tuple[Path, Path]:
    """The same with one tensor per expert and role on disk."""
    return _model_and_stats(root, data_file, "per-expert")


def test_merging_statistics_match_a_direct_computation(model_and_stats, data_file: Path) -> None:
    """dense_out_sum = sum over every token of every expert's output; logit_gram = the router logits' Gram."""
    path, stats_path = model_and_stats
    stats = StatsFile(stats_path)
    model = load_model(path)
    calib_ids = _calibration_ids(path, data_file)
    block = moe_blocks(model)[0]
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib_ids)
    handle.remove()
    with torch.no_grad():
        dense, logit_gram = _direct_merging_fields(block, torch.cat(seen).double())
    np.testing.assert_allclose(stats.get(0, "logit_gram"), logit_gram, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.get(0, "dense_out_sum"), dense, rtol=1e-4, atol=1e-4)


def _direct_merging_fields(block: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(every expert's output summed over the tokens x, the router logits' Gram), in float64."""
    logits = x @ block.gate.weight.double().T
    ex = block.experts
    dense = []
    for e in range(ex.gate_up_proj.shape[0]):
        gate, up = (x @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
        dense.append(((torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].double().T).sum(0))
    return torch.stack(dense).numpy(), (logits.T @ logits).numpy()


def _calibration_ids(path: Path, data_file: Path) -> torch.Tensor:
    from surgery.model.data import build_sequences
    from surgery.model.load import load_tokenizer

    calib = build_sequences([str(data_file)], load_tokenizer(path), RUN["samples"] + RUN["holdout"], RUN["seq_len"],
                            RUN["seed"])
    return calib.input_ids[:RUN["samples"]]  # the collector's main sequences (the rest is its holdout)


@pytest.mark.parametrize("method, layout", [(m, "fused") for m in rewrite_merge.METHODS] + [("lsq", "per-expert")])
def test_merged_checkpoint_loads_runs_and_holds_the_merged_experts(request, root: Path, cli, method: str,
                                                                   layout: str) -> None:
    path, stats_path = request.getfixturevalue("model_and_stats" if layout == "fused" else "per_expert")
    out = root / f"{path.name}-{method}"
    plan = root / "plan.json"
    plan.write_text(json.dumps({"keep": {str(layer): KEEP for layer in StatsFile(stats_path).layers}}))
    result = cli("prune", path, "--plan", plan, "--stats", stats_path, "--merge", method, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pruning.json").read_text())
    stats = StatsFile(stats_path)
    groups = {int(k): v for k, v in record["merge"]["groups"].items()}
    assert record["merge"]["method"] == method and "representative" in record["merge"]["router_rows"]
    for layer, gs in groups.items():
        assert sorted(i for g in gs for i in g) == list(range(8)) and len(gs) == len(KEEP)
        assert record["expert_map"][str(layer)] == [g[0] for g in gs]
    model = load_model(out)
    assert model.config.num_experts == len(KEEP)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 2, 7]])).logits
    assert torch.isfinite(logits).all()
    with Checkpoint(path) as src, Checkpoint(out) as ckpt:
        src_layout, layout = resolve(src.config, src.names()), resolve(ckpt.config, ckpt.names())
        gate_up, down = merge_layer(method, groups[0], lambda e: read_expert(src, src_layout, 0, e),
                                    lambda name: stats.get(0, name))
        for new in range(len(KEEP)):
            written = read_expert(ckpt, layout, 0, new)
            np.testing.assert_allclose(written["down"], down[new], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.concatenate([written["gate"], written["up"]]), gate_up[new], atol=1e-6)
            if len(groups[0][new]) == 1:  # a group of one is the expert itself, bit for bit
                original = read_expert(src, src_layout, 0, groups[0][new][0])
                assert all(np.array_equal(written[r], original[r]) for r in original)


def test_merge_without_merging_statistics_is_refused(root: Path, data_file: Path, cli) -> None:
    path = build_tiny("qwen3_moe", root / "plain", layout="fused")
    save_tiny_tokenizer(path, vocab_size=128)
    stats = root / "plain.stats.safetensors"
    collect(path, [str(data_file)], stats, **RUN)
    result = cli("prune", path, "--stats", stats, "--criterion", "frequency", "--keep", "6", "--merge", "hc-smoe",
                 "-o", root / "refused")
    assert result.exit_code == 2 and "collect --merge-stats" in result.output
    assert not (root / "refused").exists()


def test_refit_lowers_held_out_block_error(model_and_stats, root: Path, data_file: Path, cli) -> None:
    path, stats_path = model_and_stats
    out = root / f"{path.name}-refit"
    result = cli("prune", path, "--stats", stats_path, "--criterion", "frequency", "--keep", "6", "--merge", "lsq",
                 "--refit", "--calib-text", data_file, "--refit-tokens", "768", "--refit-steps", "30",
                 "--device", "cpu", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pruning.json").read_text())
    layers = record["heal"]["stages"][0]["layers"]
    assert record["merge"]["method"] == "lsq" and record["refit"]["steps_per_layer"] == 30
    assert all(v["held_out_error_after"] <= v["held_out_error_before"] for v in layers.values())
    assert any(v["held_out_error_after"] < 0.9 * v["held_out_error_before"] for v in layers.values())
    with torch.no_grad():
        assert torch.isfinite(load_model(out)(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
    card = (out / "README.md").read_text()
    assert "`lsq` merge" in card and "refit fitted" in card and "Nothing was retrained" not in card


def test_the_card_says_how_the_weights_came_to_be(model_and_stats, root: Path, data_file: Path, cli) -> None:
    """A plain prune's card says nothing was retrained; `heal` rewrites that part of the card it copies from its
    student (still an unedited card of ours afterwards)."""
    path, stats_path = model_and_stats
    pruned, healed = root / f"{path.name}-card", root / f"{path.name}-card-healed"
    assert cli("prune", path, "--stats", stats_path, "--criterion", "frequency", "--keep", "6", "-o", pruned).exit_code == 0
    card = (pruned / "README.md").read_text()
    assert "Nothing was retrained." in card and "byte-for-byte copies" in card
    result = cli("heal", pruned, "--teacher", path, "-d", data_file, "-o", healed, "--device", "cpu", "--seq-len", "24",
                 "--tokens", "480", "--local-steps", "2", "--kd-steps", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    card = (healed / "README.md").read_text()
    assert "`moe-surgery heal` trained them" in card and "a layer-local fit and logits distillation" in card
    assert "Nothing was retrained" not in card
    assert update_card_eval(healed, {"tasks": {"model": {"results": {}}}}), "still an unedited card of ours"


def test_novices_refit_fits_the_kept_experts_and_router_around_the_novices(per_expert, root: Path, data_file: Path,
                                                                          cli) -> None:
    """prune --novices --refit: the novice checkpoint's layout, novice values and config unchanged, kept experts and
    router rows refitted (held-out block error down), novices still weightless; it loads and runs."""
    path, stats_path = per_expert
    common = ["prune", path, "--stats", stats_path, "--criterion", "frequency", "--keep", "6", "--novices", "-o"]
    plain, fitted = root / "novices", root / "novices-refit"
    assert cli(*common, plain).exit_code == 0
    result = cli(*common, fitted, "--calib-text", data_file, "--refit-tokens", "768", "--refit-steps", "30",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads((fitted / "pruning.json").read_text())
    assert record["novices"] == json.loads((plain / "pruning.json").read_text())["novices"]
    assert json.loads((fitted / "config.json").read_text()) == json.loads((plain / "config.json").read_text())
    layers = record["heal"]["stages"][0]["layers"]
    assert set(layers) == set(record["novices"]) and record["refit"]["steps_per_layer"] == 30
    assert all(v["held_out_error_after"] < v["held_out_error_before"] for v in layers.values())
    with Checkpoint(plain) as a, Checkpoint(fitted) as b:
        assert sorted(a.names()) == sorted(b.names())
        changed = {n for n in a.names() if a.read_bytes(n) != b.read_bytes(n)}
    assert not any(n.endswith("approx_value") for n in changed)
    assert any(".experts." in n for n in changed) and any(n.endswith("mlp.gate.weight") for n in changed)
    with torch.no_grad():
        assert torch.isfinite(load_novice_model(fitted)(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
    refused = root / "novices-refused"
    result = cli(*common, refused, "--merge", "lsq")
    assert result.exit_code == 2 and "--novices" in result.output and not refused.exists()
    result = cli("heal", plain, "--teacher", path, "-d", data_file, "-o", refused, "--device", "cpu")
    assert result.exit_code == 2 and "--kd-steps 0" in result.output and not refused.exists()


def test_calibration_text_turns_the_refit_on_unless_told_otherwise(model_and_stats, root: Path, data_file: Path,
                                                                   cli) -> None:
    """--calib-text alone refits (the measured winner); --no-refit with it and no auto leaves it unused: refused."""
    path, stats_path = model_and_stats
    common = ["prune", path, "--stats", stats_path, "--criterion", "frequency", "--keep", "6", "--calib-text",
              data_file, "--device", "cpu"]
    out = root / f"{path.name}-default-refit"
    result = cli(*common, "--refit-tokens", "768", "--refit-steps", "5", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    refit = json.loads((out / "pruning.json").read_text())["refit"]
    assert refit["max_tokens"] == 768 and 0 < refit["tokens"] <= 768 and refit["steps_per_layer"] == 5
    # more tokens asked for than the text holds: all of the text, not an error
    short = root / f"{path.name}-short-text"
    result = cli(*common, "--refit-tokens", str(10**7), "--refit-steps", "2", "-o", short)
    assert result.exit_code == 0, result.output
    assert 0 < json.loads((short / "pruning.json").read_text())["refit"]["tokens"] < 10**7
    explicit = root / f"{path.name}-refit-seq-len"
    result = cli(*common, "--refit-tokens", "768", "--refit-steps", "2", "--seq-len", "24", "-o", explicit)
    assert result.exit_code == 0, result.output
    assert json.loads((explicit / "pruning.json").read_text())["heal"]["seq_len"] == 24
    refused = root / f"{path.name}-no-refit"
    result = cli(*common, "--no-refit", "-o", refused)
    assert result.exit_code == 2 and "--no-refit" in result.output and not refused.exists()
    for option in ("--refit-tokens", "--refit-steps"):  # 0 would read all the text / fit nothing
        result = cli(*common, option, "0", "-o", refused)
        assert result.exit_code == 2 and option in result.output and not refused.exists()


def test_the_refit_uses_its_own_sequence_length_unless_seq_len_is_given(monkeypatch, cli) -> None:
    """prune's --seq-len default (2048) is the collector's; the refit fits better on 512-token sequences, so
    it takes those unless --seq-len is given on the command line."""
    seen = []
    monkeypatch.setattr("surgery.cli.prune.run_prune", lambda *a, **k: seen.append((k["merging"], k["collect"])))
    common = ["prune", "model", "--stats", "s", "--criterion", "frequency", "--keep", "6", "-o", "out"]
    assert cli(*common).exit_code == 0 and cli(*common, "--seq-len", "2048").exit_code == 0
    (default, collect), (given, _) = seen
    assert default.seq_len == pipeline_merge.REFIT_SEQ_LEN == 512 and collect.seq_len == 2048
    assert given.seq_len == 2048


# ---------------------------------------------------------------------------------------------
# auto by the real loss


def test_auto_picks_the_lowest_measured_loss_where_the_proxy_disagrees(model_and_stats, root: Path,
                                                                       data_file: Path) -> None:
    """Two drop plans: the reconstruction proxy ranks them one way, the measured loss (checked against the
    written checkpoint's own loss) the other; auto follows the loss and records both."""
    path, stats_path = model_and_stats
    stats = StatsFile(stats_path)
    grams = {layer: stats.get(layer, "gram", holdout=True) for layer in stats.layers}
    plans = {f"drop{a}{b}": Plan({layer: [e for e in range(8) if e not in (a, b)] for layer in stats.layers})
             for a, b in itertools.combinations(range(8), 2)}
    model, spec = load_model(path), get_spec("qwen3_moe")
    ids = _calibration_ids(path, data_file)
    unpruned = model_loss(model, ids)
    loss = {name: candidate_loss(model, spec, plan, None, stats, ids) for name, plan in plans.items()}
    proxy = {name: holdout_error(plan.keep, grams) for name, plan in plans.items()}
    names = sorted(plans, key=lambda n: proxy[n])
    a, b = next((x, y) for x, y in itertools.combinations(names, 2) if loss[x] > loss[y])  # proxy a < b, loss a > b
    ranking = rank_by_loss([a, b], lambda n: loss[n])
    assert ranking.winner == b and proxy[a] < proxy[b] and ranking.losses == {a: loss[a], b: loss[b]}
    from surgery.rewrite.experts import rewrite_checkpoint

    written = rewrite_checkpoint(path, plans[b], root / f"{path.name}-{b}", overwrite=True)
    assert model_loss(load_model(written), ids) == pytest.approx(loss[b], rel=1e-5)
    assert model_loss(model, ids) == unpruned  # every candidate was undone after its measurement


def test_auto_by_loss_through_prune_records_every_candidate(model_and_stats, root: Path, data_file: Path,
                                                            cli) -> None:
    path, stats_path = model_and_stats
    out = root / f"{path.name}-auto"
    result = cli("prune", path, "--stats", stats_path, "--criterion", "auto", "--keep", "6", "--calib-text",
                 data_file, "--no-refit", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    auto = json.loads((out / "pruning.json").read_text())["plan"]["auto"]
    assert auto["by"] == "held-out loss" and {"hc-smoe", "mc-smoe", "recon/drop", "reap/lsq"} <= set(auto["losses"])
    assert auto["winner"] == min(auto["losses"], key=auto["losses"].get)
    assert load_model(out).config.num_experts == 6


def test_a_merge_candidate_is_measured_as_it_is_written(model_and_stats, root: Path, data_file: Path) -> None:
    """auto's in-memory merge (values over the representatives, others masked) is the written checkpoint."""
    path, stats_path = model_and_stats
    stats, ids = StatsFile(stats_path), _calibration_ids(path, data_file)
    plan = Plan({layer: KEEP for layer in stats.layers})
    measured = candidate_loss(load_model(path), get_spec("qwen3_moe"), plan, "hc-smoe", stats, ids)
    out = root / f"{path.name}-measured-hc"
    pipeline_merge.write_merge_or_refit(path, plan, out, stats_path, pipeline_merge.MergeOptions(merge="hc-smoe"),
                                        overwrite=True, progress=False)
    assert model_loss(load_model(out), ids) == pytest.approx(measured, rel=1e-6)
