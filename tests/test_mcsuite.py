"""MC-Suite criteria (surgery.criteria.mcsuite) on hand-made weights and statistics with known answers,
the drop direction (`oriented`, `--drop`) and its refusal for set selectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from stats_factory import default_calibration, default_model, make_stats

from stats_formats import StatsFile
from surgery.cli import main
from surgery.cli_score import criteria_cmd, score_cmd
from surgery.criteria import AUTO, CRITERIA, LayerInput
from surgery.criteria.mcsuite import SIGNALS, default_drop, oriented
from surgery.plan import PlanError, make_plan

INF = np.inf
MCS = ["mcs-ewn", "mcs-wsr", "mcs-ews", "mcs-euf", "mcs-ecc", "mcs-ean", "mcs-eae", "mcs-eas"]


def score(name: str, num_experts: int, stats: dict | None = None, weights=None) -> np.ndarray:
    return CRITERIA[name].layer_scores(LayerInput(0, num_experts, stats=stats, weights=weights))


def keep_of(name: str, num_experts: int, num_keep: int, **inputs) -> list[int]:
    inp = LayerInput(0, num_experts, **inputs)
    return make_plan({0: CRITERIA[name].layer_scores(inp)}, num_experts, 1, keep=num_keep)[0]


def matrices(per_expert: list[tuple[list, list, list]]):
    def weights(e: int) -> dict[str, np.ndarray]:
        gate, up, down = per_expert[e]
        return {k: np.asarray(m, dtype=np.float32) for k, m in zip(("gate", "up", "down"), (gate, up, down))}

    return weights


Z = [[0, 0], [0, 0]]
I2 = [[1, 0], [0, 1]]
# expert 0: gate diag(3, 4), up identity, down rank one; expert 1: gate all ones (rank one), up identity,
# down zero; expert 2: all zero
WEIGHTS = matrices([([[3, 0], [0, 4]], I2, [[2, 0], [0, 0]]), ([[1, 1], [1, 1]], I2, Z), (Z, Z, Z)])


def test_registered_with_one_line_formulas() -> None:
    assert list(SIGNALS) == MCS
    for name in MCS:
        crit = CRITERIA[name]
        assert crit.select is None and crit.formula and "\n" not in crit.formula
    lines = CliRunner().invoke(criteria_cmd, []).output.splitlines()
    listed = {line.split()[0] for line in lines}
    assert set(MCS) <= listed


def test_ewn() -> None:
    np.testing.assert_allclose(score("mcs-ewn", 3, weights=WEIGHTS), [np.sqrt(31.0), np.sqrt(6.0), 0.0])
    assert CRITERIA["mcs-ewn"].needs == "weights"


def test_wsr() -> None:
    # stable ranks: E0 (25/16, 2, 1), E1 (1, 2, zero matrix 0), E2 all 0
    np.testing.assert_allclose(score("mcs-wsr", 3, weights=WEIGHTS), [(25 / 16 + 3) / 3, 1.0, 0.0])


def test_ews_drops_the_most_similar_by_default() -> None:
    v = [[1, 2], [0, 1]]
    w = matrices([(v, Z, Z), (np.multiply(v, 2).tolist(), Z, Z), (Z, Z, [[1, 0], [0, 0]]), (Z, Z, Z)])
    # cosines: 0~1 = 1, 2 orthogonal to both, 3 is zero (cosine 0); mean over the 3 others, negated
    np.testing.assert_allclose(score("mcs-ews", 4, weights=w), [-1 / 3, -1 / 3, 0.0, 0.0], atol=1e-12)
    assert keep_of("mcs-ews", 4, 3, weights=w) in ([0, 2, 3], [1, 2, 3])


STATS = {
    "tokens": np.array([4.0]),
    "count": np.array([3.0, 1.0, 0.0]),
    "coselect": np.array([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    # expert 0 saw channel 0 = {0, 2, 4} (variance 4) and channel 1 = {-1, 0, 1} (variance 1); expert 1 saw (1, 0)
    "out_sum": np.array([[6.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
    "out_sq_sum": np.array([[20.0, 2.0], [1.0, 0.0], [0.0, 0.0]]),
}


def test_euf() -> None:
    np.testing.assert_allclose(score("mcs-euf", 3, stats=STATS), [0.75, 0.25, 0.0])
    assert CRITERIA["mcs-euf"].needs == "stats"


def test_ecc() -> None:
    np.testing.assert_array_equal(score("mcs-ecc", 3, stats=STATS), [1 / 3, 1.0, -INF])


def test_ean_is_sum_of_channel_roots() -> None:
    np.testing.assert_allclose(score("mcs-ean", 3, stats=STATS), [np.sqrt(20.0) + np.sqrt(2.0), 1.0, 0.0])


def test_eae_gaussian_entropy_proxy() -> None:
    s = score("mcs-eae", 3, stats=STATS)
    np.testing.assert_allclose(s[0], 0.5 * (np.log(4 + 1e-12) + np.log(1 + 1e-12)), rtol=1e-12)
    np.testing.assert_allclose(s[0], np.log(2.0), rtol=1e-9)
    assert list(s[1:]) == [-INF, -INF]  # n_i <= 1: variance undefined


def test_eae_zero_variance_channel_uses_the_epsilon() -> None:
    stats = {"count": np.array([2.0]), "out_sum": np.array([[2.0, 0.0]]), "out_sq_sum": np.array([[2.0, 2.0]])}
    # channel 0 = {1, 1}: variance 0; channel 1 = {-1, 1}: variance 2
    np.testing.assert_allclose(score("mcs-eae", 1, stats=stats), [0.5 * (np.log(1e-12) + np.log(2 + 1e-12))])


EAS_STATS = {
    "count": np.array([2.0, 1.0, 4.0, 0.0]),
    # mean unit directions: (1, 0), (0, 1), (1, 1)/sqrt 2 up to scale, expert 3 never routed
    "out_unit_sum": np.array([[2.0, 0.0], [0.0, 1.0], [4.0, 4.0], [0.0, 0.0]]),
}


def test_eas_drops_the_most_similar_by_default() -> None:
    c = 1 / np.sqrt(2.0)
    expected = [-c / 3, -c / 3, -2 * c / 3, -INF]
    np.testing.assert_allclose(score("mcs-eas", 4, stats=EAS_STATS), expected)
    assert keep_of("mcs-eas", 4, 2, stats=EAS_STATS) == [0, 1]  # never routed first, then the most similar


def test_default_directions() -> None:
    assert {n: default_drop(n) for n in MCS} == {n: "high" if n in ("mcs-ews", "mcs-eas") else "low" for n in MCS}
    assert default_drop("reap") == default_drop("aimer") == "low"


def test_drop_flips_scores_and_keeps_undefined_last() -> None:
    inp = LayerInput(0, 3, stats=STATS)
    assert oriented(CRITERIA["mcs-eae"], "low") is CRITERIA["mcs-eae"]
    assert oriented(CRITERIA["mcs-eae"], None) is CRITERIA["mcs-eae"]
    flipped = oriented(CRITERIA["mcs-eae"], "high")
    assert flipped.name == "mcs-eae"
    np.testing.assert_allclose(flipped.layer_scores(inp), [-np.log(2.0), -INF, -INF], rtol=1e-9)
    np.testing.assert_allclose(oriented(CRITERIA["mcs-ean"], "high").layer_scores(inp),
                               [-(np.sqrt(20.0) + np.sqrt(2.0)), -1.0, 0.0])
    c = 1 / np.sqrt(2.0)
    eas_low = oriented(CRITERIA["mcs-eas"], "low").layer_scores(LayerInput(0, 4, stats=EAS_STATS))
    np.testing.assert_allclose(eas_low, [c / 3, c / 3, 2 * c / 3, -INF])
    assert oriented(CRITERIA["mcs-eas"], "high") is CRITERIA["mcs-eas"]
    # any criterion flips, e.g. the family's frequency
    np.testing.assert_array_equal(oriented(CRITERIA["frequency"], "high").layer_scores(
        LayerInput(0, 2, stats={"count": np.array([1.0, 2.0]), "moment_g": np.ones((3, 3, 2))})), [-1.0, -1.0])


@pytest.mark.parametrize("name", ["recon", AUTO])
def test_drop_refused_for_set_selectors(name: str) -> None:
    with pytest.raises(PlanError, match="--drop"):
        oriented(CRITERIA[name], "low")


def write_stats(path: Path) -> Path:
    model = default_model(num_experts=8, hidden=4, inter=3, layers=(0, 2), top_k=2)
    StatsFile.from_arrays(model, default_calibration(120, 0), make_stats(model, 120, seed=1)).save(path)
    return path


def test_score_drop_option(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    docs = {}
    for drop in (None, "low", "high"):
        out = tmp_path / f"{drop}.json"
        extra = ["--drop", drop] if drop else []
        result = CliRunner().invoke(score_cmd, [str(stats), "--criterion", "mcs-ean", "--ratio", "0.5", "-o", str(out),
                                                *extra])
        assert result.exit_code == 0, result.output
        docs[drop] = json.loads(out.read_text())
    assert "drop" not in docs[None] and docs["low"]["drop"] == "low" and docs["high"]["drop"] == "high"
    assert docs[None]["keep"] == docs["low"]["keep"]
    for layer, kept in docs["low"]["keep"].items():
        assert sorted(kept + docs["high"]["keep"][layer]) == list(range(8))  # opposite halves
        assert docs["high"]["scores"][layer] == [-s for s in docs["low"]["scores"][layer]]


def test_score_drop_refused_for_recon(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    result = CliRunner().invoke(score_cmd, [str(stats), "--criterion", "recon", "--drop", "low", "--ratio", "0.5",
                                            "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert result.output.startswith("Error:") and result.output.count("\n") == 1 and "--drop" in result.output


@pytest.mark.parametrize("name", ["recon", AUTO])
def test_prune_drop_refused_for_set_selectors(name: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "model"), "--criterion", name, "--drop", "high",
                                       "--ratio", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("Error:") and result.output.count("\n") == 1 and "--drop" in result.output


def test_prune_passes_drop_through(tmp_path: Path) -> None:
    from tiny_models import build_tiny

    src = build_tiny("qwen3_moe", tmp_path / "src")
    plans = {}
    for drop in ("low", "high"):
        out = tmp_path / drop
        result = CliRunner().invoke(main, ["prune", str(src), "--criterion", "mcs-ewn", "--drop", drop,
                                           "--ratio", "0.5", "-o", str(out)])
        assert result.exit_code == 0, result.output
        plans[drop] = json.loads((out / "pruning.json").read_text())["plan"]
    for layer, kept in plans["low"]["keep"].items():
        assert plans["low"]["drop"] == "low" and plans["high"]["drop"] == "high"
        assert sorted(kept + plans["high"]["keep"][layer]) == list(range(len(plans["low"]["scores"][layer])))
