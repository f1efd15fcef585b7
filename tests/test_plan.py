"""Keep plans (surgery.plan.select) and the `criteria` / `score` commands (surgery.cli.score)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from stats_factory import default_calibration, default_model, make_stats

from stats_formats import StatsFile
from surgery.criteria import CRITERIA, LayerInput
from surgery.errors import PlanError
from surgery.plan import Plan
from surgery.plan.select import keep_count, make_plan, normalised

SCORES = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6])  # best first: 1, 5, 3, 7, 0, 4, 6, 2


# ---------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize(
    ("num_experts", "ratio", "kept"),
    [(8, 0.25, 6), (8, 0.0, 8), (8, 0.3, 6), (6, 0.25, 4), (64, 0.5, 32), (60, 0.125, 52)],
)
def test_ratio_is_the_fraction_removed(num_experts: int, ratio: float, kept: int) -> None:
    # E - round(ratio * E), halves rounded up (6 * 0.25 = 1.5 -> 2 removed)
    assert keep_count(num_experts, 2, ratio=ratio) == kept


def test_keep_and_ratio_are_exclusive() -> None:
    with pytest.raises(PlanError, match="exactly one"):
        keep_count(8, 2)
    with pytest.raises(PlanError, match="exactly one"):
        keep_count(8, 2, ratio=0.5, keep=4)
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        keep_count(8, 2, ratio=1.0)
    with pytest.raises(PlanError, match="has 8"):
        keep_count(8, 2, keep=9)


def test_top_k_floor_is_an_error() -> None:
    with pytest.raises(PlanError, match="below top_k=2.*ratio at most 0.75"):
        keep_count(8, 2, ratio=0.9)
    with pytest.raises(PlanError, match="below top_k=4"):
        make_plan({0: SCORES}, 8, 4, keep=3)
    assert keep_count(8, 2, ratio=0.75) == 2


# ---------------------------------------------------------------------------------------------
# uniform plans


def test_uniform_plan_keeps_best_sorted() -> None:
    plan = make_plan({3: SCORES, 1: SCORES[::-1].copy()}, 8, 2, ratio=0.5)
    assert plan == {1: [0, 2, 4, 6], 3: [1, 3, 5, 7]}
    assert list(plan) == [1, 3]


def test_ties_break_by_expert_id_and_plans_are_deterministic() -> None:
    scores = np.array([1.0, 2.0, 1.0, 2.0, 1.0, -np.inf])
    assert make_plan({0: scores}, 6, 1, keep=3) == {0: [0, 1, 3]}
    assert all(make_plan({0: scores}, 6, 1, keep=k) == make_plan({0: scores.copy()}, 6, 1, keep=k) for k in range(1, 7))
    assert make_plan({0: scores}, 6, 1, keep=5) == {0: [0, 1, 2, 3, 4]}  # -inf goes first


def test_bad_scores_are_errors() -> None:
    with pytest.raises(PlanError, match="NaN"):
        make_plan({0: np.array([1.0, np.nan, 0.0])}, 3, 1, keep=2)
    with pytest.raises(PlanError, match="layer 4: 2 scores for 3 experts"):
        make_plan({4: np.array([1.0, 0.0])}, 3, 1, keep=2)


# ---------------------------------------------------------------------------------------------
# group-limited routing


def test_groups_keep_equal_numbers_from_their_own_blocks() -> None:
    # the 4 best overall (7, 6, 5, 4) all sit in the second block
    scores = np.arange(8, dtype=float)
    assert make_plan({0: scores}, 8, 2, keep=4) == {0: [4, 5, 6, 7]}
    plan = make_plan({0: scores}, 8, 2, keep=4, groups=2)
    assert plan == {0: [2, 3, 6, 7]}
    plan = make_plan({0: SCORES}, 8, 2, keep=4, groups=4)
    assert plan == {0: [1, 3, 5, 7]}  # the better of each pair


def test_groups_reject_uneven_counts_and_list_valid_ones() -> None:
    with pytest.raises(PlanError, match=r"n_group=2.*valid keep counts: \[2, 4, 6, 8\]"):
        make_plan({0: SCORES}, 8, 2, keep=3, groups=2)
    with pytest.raises(PlanError, match=r"at least 2 per group.*valid keep counts: \[4, 6, 8\]"):
        make_plan({0: SCORES}, 8, 2, keep=2, groups=2, min_group_size=2)
    with pytest.raises(PlanError, match="do not split"):
        make_plan({0: SCORES}, 8, 2, keep=6, groups=3)
    assert make_plan({0: SCORES}, 8, 2, keep=6, groups=1) == make_plan({0: SCORES}, 8, 2, keep=6)


def test_selector_receives_groups_and_is_checked() -> None:
    calls = []

    def select(num_keep: int, n_group: int | None) -> list[int]:
        calls.append((num_keep, n_group))
        return [7, 0, 4, 3]

    assert make_plan({0: select}, 8, 2, keep=4, groups=2) == {0: [0, 3, 4, 7]}
    assert calls == [(4, 2)]
    with pytest.raises(PlanError, match="invalid keep set"):
        make_plan({0: lambda k, g: [0, 1, 2, 4]}, 8, 2, keep=4, groups=2)
    with pytest.raises(PlanError, match="invalid keep set"):
        make_plan({0: lambda k, g: [0, 0, 1, 2]}, 8, 2, keep=4)


def test_recon_plan_with_groups() -> None:
    gram = np.diag([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])
    crit = CRITERIA["recon"]
    inp = LayerInput(0, 8, stats={"gram": gram})
    ranker = crit.ranker(inp, crit.layer_scores(inp))
    assert make_plan({0: ranker}, 8, 2, keep=4) == {0: [0, 1, 2, 3]}
    assert make_plan({0: ranker}, 8, 2, keep=4, groups=2) == {0: [0, 1, 6, 7]}


# ---------------------------------------------------------------------------------------------
# global ranking


def test_normalised_is_the_share_of_the_layer() -> None:
    np.testing.assert_allclose(normalised(np.array([3.0, 1.0, -np.inf])), [0.75, 0.25, -np.inf])
    np.testing.assert_array_equal(normalised(np.zeros(3)), np.zeros(3))


def test_global_is_non_uniform_and_respects_top_k() -> None:
    # layer 0 concentrates its importance in expert 0, layer 1 spreads it evenly
    rankers = {0: np.array([97.0, 1.0, 1.0, 1.0]), 1: np.array([1.0, 1.0, 1.0, 1.0])}
    assert make_plan(rankers, 4, 1, ratio=0.5, global_rank=True) == {0: [0], 1: [0, 1, 2]}
    plan = make_plan(rankers, 4, 2, ratio=0.5, global_rank=True)
    assert plan == {0: [0, 1], 1: [0, 1]}  # the floor of top_k = 2 stops layer 0 at two experts
    assert make_plan(rankers, 4, 1, keep=4, global_rank=True) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_global_removes_the_same_total() -> None:
    rng = np.random.default_rng(0)
    rankers = {l: rng.random(8) ** (l + 1) for l in range(5)}
    plan = make_plan(rankers, 8, 2, ratio=0.25, global_rank=True)
    assert sum(map(len, plan.values())) == 5 * 6
    assert min(map(len, plan.values())) >= 2
    assert plan == make_plan(rankers, 8, 2, ratio=0.25, global_rank=True)


def test_global_refuses_selectors_and_groups() -> None:
    with pytest.raises(PlanError, match="cannot be used with --global"):
        make_plan({0: lambda k, g: list(range(k))}, 4, 1, keep=2, global_rank=True)
    with pytest.raises(PlanError, match="group-limited"):
        make_plan({0: SCORES}, 8, 2, keep=4, global_rank=True, groups=2)


# ---------------------------------------------------------------------------------------------
# plan document


def test_plan_document() -> None:
    doc = Plan({1: [0, 2], 0: [1, 2]}, "reap", 0.333, {0: np.array([1.0, 2.0, -np.inf]),
               1: np.array([3.0, 0.0, 1.0])}, "ab" * 32, {"top_k": 1}).to_json()
    assert doc == {
        "keep": {"0": [1, 2], "1": [0, 2]}, "criterion": "reap", "ratio": 0.333, "keep_per_layer": 2,
        "scores": {"0": [1.0, 2.0, None], "1": [3.0, 0.0, 1.0]}, "stats_sha256": "ab" * 32, "uniform": True,
        "top_k": 1,
    }
    json.dumps(doc, allow_nan=False)
    doc = Plan({0: [0], 1: [0, 1]}, "reap", 0.5, {}, None).to_json()
    assert doc["uniform"] is False and doc["keep_per_layer"] == {"0": 1, "1": 2}


# ---------------------------------------------------------------------------------------------
# commands


def write_stats(path: Path, holdout: bool = True, **model_extra) -> Path:
    model = {**default_model(num_experts=8, hidden=4, inter=3, layers=(0, 2), top_k=2), **model_extra}
    tensors = make_stats(model, 120, seed=1, holdout_tokens=60 if holdout else 0)
    StatsFile.from_arrays(model, default_calibration(120, 1 if holdout else 0), tensors).save(path)
    return path


def run(args: list[str]):
    from surgery.cli import main

    return CliRunner().invoke(main, args)


def test_criteria_command_lists_everything() -> None:
    result = run(["criteria"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == list(CRITERIA)
    assert any(line.startswith("aimer") and "needs weights" in line for line in lines)


def test_score_help_mentions_groups_and_global() -> None:
    text = " ".join(run(["score", "--help"]).output.split())
    assert "same number of experts in every group" in text
    assert "vanilla transformers cannot load" in text


def test_score_writes_a_plan(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    out = tmp_path / "plan.json"
    result = run(["score", str(stats), "--criterion", "reap", "--ratio", "0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["criterion"] == "reap" and doc["keep_per_layer"] == 6 and doc["uniform"] is True
    assert set(doc["keep"]) == {"0", "2"} and doc["stats_sha256"] == StatsFile(stats).sha256
    assert doc["keep"] == {
        l: sorted(np.lexsort((np.arange(8), -np.array(s)))[:6].tolist()) for l, s in doc["scores"].items()
    }
    again = run(["score", str(stats), "--criterion", "frequency", "--ratio", "0.5", "-o", str(out)])
    assert again.exit_code == 2 and again.stderr.strip().splitlines() == [
        f"Error: {out}: already exists; pass --overwrite to replace it"]
    assert json.loads(out.read_text())["criterion"] == "reap"  # untouched
    replaced = run(["score", str(stats), "--criterion", "frequency", "--ratio", "0.5", "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and json.loads(out.read_text())["criterion"] == "frequency"


def test_score_global_warns_and_is_non_uniform(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    out = tmp_path / "plan.json"
    result = run(["score", str(stats), "--criterion", "frequency", "--keep", "4", "--global", "-o", str(out)])
    assert result.exit_code == 0
    assert "Warning: --global" in result.output
    doc = json.loads(out.read_text())
    assert sum(map(len, doc["keep"].values())) == 8 and doc["global"] is True


def test_score_groups_from_stats_metadata(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors", n_group=4, min_group_size=1)
    out = tmp_path / "plan.json"
    result = run(["score", str(stats), "--criterion", "recon", "--keep", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for ids in json.loads(out.read_text())["keep"].values():
        assert [i // 2 for i in ids] == [0, 1, 2, 3]
    result = run(["score", str(stats), "--criterion", "man", "--keep", "6", "-o", str(out), "--overwrite"])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "valid keep counts: [4, 8]" in result.output


def test_score_auto(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    out = tmp_path / "plan.json"
    result = run(["score", str(stats), "--criterion", "auto", "--keep", "4", "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    auto = json.loads(out.read_text())["auto"]
    assert len(auto["errors"]) == 9 and auto["errors"][auto["winner"]] == min(auto["errors"].values())
    assert f"winner: {auto['winner']}" in result.output


def test_score_auto_needs_holdout(tmp_path: Path) -> None:
    plain = write_stats(tmp_path / "plain.safetensors", holdout=False)
    out = tmp_path / "plan.json"
    result = run(["score", str(plain), "--criterion", "auto", "--keep", "4", "-o", str(out)])
    assert result.exit_code == 2 and "--holdout" in result.output and not out.exists()
    other = write_stats(tmp_path / "other.safetensors", holdout=False)
    args = ["score", str(plain), "--criterion", "auto", "--keep", "4", "--holdout-stats", str(other), "-o", str(out)]
    assert run(args).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--criterion", "reap", "--keep", "1"], "below top_k=2"),
        (["--criterion", "reap"], "exactly one"),
        (["--criterion", "aimer", "--keep", "4"], "--model"),
        (["--criterion", "reap", "--keep", "4", "--global"], None),
    ],
)
def test_score_errors_are_one_line(tmp_path: Path, args: list[str], message: str | None) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    result = run(["score", str(stats), *args, "-o", str(tmp_path / "p.json")])
    if message is None:
        assert result.exit_code == 0
        return
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("Error: ") and message in result.output


def test_score_missing_stats_file(tmp_path: Path) -> None:
    result = run(["score", str(tmp_path / "nope.safetensors"), "--criterion", "reap", "--keep", "4",
                  "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_score_weight_criteria_from_the_checkpoint(tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from tiny_models import build_tiny

    model_dir = build_tiny("qwen3_moe", tmp_path / "m", shards=1)
    tensors = {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    out = tmp_path / "plan.json"
    result = run(["score", "--criterion", "aimer", "--keep", "4", "--model", str(model_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for layer, scores in doc["scores"].items():
        for e, s in enumerate(scores):
            w = np.concatenate([tensors[f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"].ravel()
                                for p in ("gate", "up", "down")]).astype(np.float64)
            assert s == pytest.approx(-np.abs(w).mean() / np.sqrt((w**2).mean()), rel=1e-9)
    assert doc["stats_sha256"] is None and doc["keep_per_layer"] == 4
    result = run(["score", "--criterion", "random", "--keep", "4", "--model", str(model_dir), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
