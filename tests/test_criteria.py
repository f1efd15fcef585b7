"""Criteria (surgery.criteria) on hand-made statistics with known answers, recon against brute force,
and auto's choice by held-out error."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from stats_factory import default_model, fake_tokens, layer_fields

from surgery.criteria import AUTO, CRITERIA, PRESETS, LayerInput, auto_candidates, holdout_error, holdout_grams, run_auto
from surgery.criteria.reconstruction import drop_error, recon_scores, recon_select
from surgery.errors import PlanError
from surgery.plan.select import make_plan

INF = np.inf


def moments(entries: dict[tuple[int, int], list[float]], num_experts: int) -> np.ndarray:
    """A moment_g tensor [3, 3, E] that is zero except the given (a, b) slices."""
    m = np.zeros((3, 3, num_experts))
    for (a, b), values in entries.items():
        m[a, b] = values
    return m


def score(name: str, num_experts: int = 4, stats: dict | None = None, weights=None, index: int = 0, seed: int = 0):
    return CRITERIA[name].layer_scores(LayerInput(index, num_experts, stats=stats, weights=weights, seed=seed))


def keep_of(name: str, stats: dict, num_keep: int, num_experts: int = 4) -> list[int]:
    crit = CRITERIA[name]
    inp = LayerInput(0, num_experts, stats=stats)
    return make_plan({0: crit.ranker(inp, crit.layer_scores(inp))}, num_experts, 1, keep=num_keep)[0]


# Four experts; expert 1 is never routed (n = 0, so every moment is 0).
COUNT = [2.0, 0.0, 4.0, 1.0]
FAMILY_LAYER = {
    "count": np.array(COUNT),
    "moment_g": moments(
        {
            (0, 0): COUNT,
            (1, 0): [1.0, 0.0, 1.2, 0.9],
            (0, 1): [6.0, 0.0, 8.0, 5.0],
            (1, 1): [3.0, 0.0, 2.0, 4.0],
            (0, 2): [20.0, 0.0, 16.0, 30.0],
            (2, 2): [5.0, 0.0, 1.0, 12.0],
        },
        4,
    ),
}

FAMILY_EXPECTED = {
    "frequency": [2, 0, 4, 1],
    "soft_frequency": [1.0, 0.0, 1.2, 0.9],
    "ean": [6.0, 0.0, 8.0, 5.0],
    "gated_ean": [3.0, 0.0, 2.0, 4.0],
    "gated_sq": [5.0, 0.0, 1.0, 12.0],
    "reap": [1.5, -INF, 0.5, 4.0],
    "man": [3.0, -INF, 2.0, 5.0],
    "msan": [10.0, -INF, 4.0, 30.0],
}


@pytest.mark.parametrize("name", list(FAMILY_EXPECTED))
def test_family_scores(name: str) -> None:
    np.testing.assert_array_equal(score(name, stats=FAMILY_LAYER), FAMILY_EXPECTED[name])


def test_family_presets_are_the_unified_parameters() -> None:
    assert PRESETS["reap"] == (1, 1, 1) and PRESETS["gated_sq"] == (0, 2, 2) and PRESETS["msan"] == (1, 0, 2)


@pytest.mark.parametrize("name", ["reap", "man", "msan"])
def test_mean_criteria_rank_unrouted_experts_last(name: str) -> None:
    # keeping 3 of 4 always drops the never-routed expert 1, even though its mean would be 0/0
    assert keep_of(name, FAMILY_LAYER, 3) == [0, 2, 3]


def test_frequency_and_reap_disagree_on_rare_strong_experts() -> None:
    assert keep_of("frequency", FAMILY_LAYER, 2) == [0, 2]
    assert keep_of("reap", FAMILY_LAYER, 2) == [0, 3]


def mone_layer() -> dict[str, np.ndarray]:
    """Expert 0: outputs (1,0),(2,0),(3,0); expert 1: (0,1),(0,3); expert 2: one token; expert 3: none;
    expert 4: four identical outputs (5,5)."""
    return {
        "tokens": np.array([10.0]),
        "count": np.array([3.0, 2.0, 1.0, 0.0, 4.0]),
        "moment_g": moments({(1, 0): [1.5, 1.0, 0.7, 0.0, 2.0]}, 5),
        "out_sum": np.array([[6.0, 0.0], [0.0, 4.0], [1.0, 1.0], [0.0, 0.0], [20.0, 20.0]]),
        "out_sq_sum": np.array([[14.0, 0.0], [0.0, 10.0], [1.0, 1.0], [0.0, 0.0], [100.0, 100.0]]),
    }


def test_mone_hand_made() -> None:
    # variances: expert 0 -> 1 (phi_var 1), expert 1 -> 2 (phi_var sqrt 2), expert 4 -> 0
    expected = [1.0 * 0.15, np.sqrt(2.0) * 0.1, -INF, -INF, 0.0]
    np.testing.assert_allclose(score("mone", 5, mone_layer()), expected)


def test_mone_matches_per_token_variance() -> None:
    model = default_model(num_experts=4, hidden=3, inter=2, top_k=2)
    tokens = fake_tokens(model, 200, np.random.default_rng(3))
    fields = layer_fields(tokens)
    expected = []
    for e in range(4):
        routed = tokens.r[:, e] > 0
        var = tokens.f[routed, e].var(axis=0, ddof=1).sum()
        expected.append(np.sqrt(var) * tokens.g[routed, e].sum() / len(tokens))
    np.testing.assert_allclose(score("mone", 4, fields), expected, rtol=1e-9)


def linear_weights(per_expert: list[list[float]]):
    """Experts with H = 2, I = 1: gate [1,2], up [1,2], down [2,1] from six numbers each."""

    def get(e: int) -> dict[str, np.ndarray]:
        w = np.array(per_expert[e], dtype=np.float32)
        return {"gate": w[0:2].reshape(1, 2), "up": w[2:4].reshape(1, 2), "down": w[4:6].reshape(2, 1)}

    return get


def test_weight_norm() -> None:
    weights = linear_weights([[3, 0, 0, 0, 4, 0], [1, 1, 1, 1, 1, 1], [0] * 6])
    np.testing.assert_allclose(score("weight_norm", 3, weights=weights), [5.0, np.sqrt(6.0), 0.0])


def test_aimer_prunes_flat_experts_first() -> None:
    # all |w| equal: mean|w|/RMS = 1 (highest AIMER, pruned first); one spike: (3/6)/sqrt(9/6) = 1/sqrt(6)
    weights = linear_weights([[1, -1, 1, -1, 1, -1], [3, 0, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_allclose(score("aimer", 3, weights=weights), [-1.0, -1 / np.sqrt(6.0), -INF])
    assert CRITERIA["aimer"].needs == "weights"


def test_weight_criteria_need_weights() -> None:
    with pytest.raises(ValueError, match="--model"):
        score("aimer", 3, stats=FAMILY_LAYER)


def test_loo_is_the_gram_diagonal() -> None:
    gram = np.array([[4.0, 1.0, 0.0], [1.0, 9.0, -2.0], [0.0, -2.0, 1.0]])
    np.testing.assert_array_equal(score("loo", 3, {"gram": gram}), [4.0, 9.0, 1.0])


def test_random_is_seeded_per_layer() -> None:
    a = score("random", 6, index=3, seed=7)
    np.testing.assert_array_equal(a, np.random.default_rng(10).random(6))
    np.testing.assert_array_equal(a, score("random", 6, index=3, seed=7))
    assert not np.array_equal(a, score("random", 6, index=4, seed=7))
    assert CRITERIA["random"].needs == "none"


def test_every_criterion_is_listed_with_formula_and_needs() -> None:
    required = {"frequency", "soft_frequency", "reap", "ean", "man", "msan", "gated_ean", "gated_sq", "mone",
                "weight_norm", "aimer", "loo", "random", "recon", "auto"}
    assert required <= set(CRITERIA)
    for crit in CRITERIA.values():
        assert crit.formula and "\n" not in crit.formula
        assert crit.needs in ("stats", "weights", "none")


# ---------------------------------------------------------------------------------------------
# recon


def random_gram(num_experts: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(num_experts, num_experts - 2))
    return a @ a.T


def brute_force_keep(gram: np.ndarray, num_keep: int, n_group: int = 1) -> tuple[list[int], float]:
    e = gram.shape[0]
    size = e // n_group
    best: tuple[float, list[int]] | None = None
    for dropped in combinations(range(e), e - num_keep):
        per_group = np.bincount(np.array(dropped, dtype=int) // size, minlength=n_group)
        if len(set(per_group.tolist())) != 1:
            continue
        cost = drop_error(gram, list(dropped))
        if best is None or cost < best[0]:
            best = (cost, sorted(set(range(e)) - set(dropped)))
    assert best is not None
    return best[1], best[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_keep", range(1, 8))
def test_recon_equals_brute_force(seed: int, num_keep: int) -> None:
    gram = random_gram(8, seed)
    expected, _ = brute_force_keep(gram, num_keep)
    assert recon_select(LayerInput(0, 8, stats={"gram": gram}), num_keep) == expected


@pytest.mark.parametrize("num_keep", [2, 4, 6])
def test_recon_groups_equal_brute_force(num_keep: int) -> None:
    gram = random_gram(8, 5)
    expected, _ = brute_force_keep(gram, num_keep, n_group=2)
    kept = recon_select(LayerInput(0, 8, stats={"gram": gram}), num_keep, 2)
    assert kept == expected
    assert sum(i < 4 for i in kept) == num_keep // 2


def test_recon_keeps_cancelling_experts_out() -> None:
    # experts 0 and 1 are big but cancel each other: dropping both costs 4 + 4 - 8 = 0
    gram = np.array([[4.0, -4.0, 0.0], [-4.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    stats = {"gram": gram}
    assert keep_of("loo", stats, 1, 3) == [0]
    assert keep_of("recon", stats, 1, 3) == [2]


@pytest.mark.parametrize("seed", range(4))
def test_recon_greedy_is_swap_optimal(seed: int) -> None:
    gram = random_gram(10, seed)
    inp = LayerInput(0, 10, stats={"gram": gram})
    kept = recon_select(inp, 5, exact_limit=0)
    dropped = sorted(set(range(10)) - set(kept))
    cost = drop_error(gram, dropped)
    for i in dropped:
        for j in kept:
            assert drop_error(gram, [d for d in dropped if d != i] + [j]) >= cost - 1e-9
    _, optimum = brute_force_keep(gram, 5)
    assert cost >= optimum - 1e-9


def test_recon_greedy_is_exact_on_diagonal_gram() -> None:
    gram = np.diag([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    assert recon_select(LayerInput(0, 6, stats={"gram": gram}), 3, exact_limit=0) == [0, 2, 5]
    assert recon_select(LayerInput(0, 6, stats={"gram": gram}), 2, 2, exact_limit=0) == [0, 5]


def test_recon_large_layer_uses_greedy() -> None:
    gram = random_gram(40, 9)
    kept = recon_select(LayerInput(0, 40, stats={"gram": gram}), 20, 4)
    assert len(kept) == 20 and [sum(i // 10 == b for i in kept) for b in range(4)] == [5, 5, 5, 5]


def test_recon_scores_are_elimination_order() -> None:
    scores = recon_scores(LayerInput(0, 3, stats={"gram": np.diag([3.0, 1.0, 2.0])}))
    np.testing.assert_array_equal(scores, [2.0, 0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# auto


def auto_layer(holdout_diag: list[float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """frequency keeps {0, 1} (frequent but weak), man keeps {2, 3} (rare but strong)."""
    stats = {
        "count": np.array([10.0, 10.0, 1.0, 1.0]),
        "moment_g": moments({(0, 0): [10, 10, 1, 1], (0, 1): [10.0, 10.0, 5.0, 5.0]}, 4),
    }
    return stats, np.diag(holdout_diag)


def plan_fn(num_keep: int):
    return lambda rankers: make_plan(rankers, 4, 1, keep=num_keep)


def test_auto_picks_lowest_holdout_error() -> None:
    stats, gram = auto_layer([1.0, 1.0, 10.0, 10.0])
    inputs = {0: LayerInput(0, 4, stats=stats)}
    candidates = {n: CRITERIA[n] for n in ("frequency", "man")}
    result = run_auto(candidates, inputs, {0: gram}, plan_fn(2))
    assert result.errors == pytest.approx({"frequency": 20 / 22, "man": 2 / 22})
    assert result.winner == "man" and result.keep == {0: [2, 3]}
    # flip the held-out data: now the frequent experts matter
    result = run_auto(candidates, inputs, {0: np.diag([10.0, 10.0, 1.0, 1.0])}, plan_fn(2))
    assert result.winner == "frequency" and result.keep == {0: [0, 1]}


def test_auto_compares_every_stats_candidate() -> None:
    model = default_model(num_experts=6, hidden=3, inter=2, top_k=2)
    rng = np.random.default_rng(0)
    fields = layer_fields(fake_tokens(model, 80, rng))
    holdout = layer_fields(fake_tokens(model, 40, rng))["gram"]
    inputs = {0: LayerInput(0, 6, stats=fields)}
    result = run_auto(auto_candidates(False), inputs, {0: holdout}, lambda r: make_plan(r, 6, 2, keep=3))
    assert list(result.errors) == ["frequency", "soft_frequency", "reap", "ean", "man", "msan", "gated_sq",
                                   "mone", "recon"]
    assert result.errors[result.winner] == min(result.errors.values())
    assert "recon" not in auto_candidates(True) and AUTO not in auto_candidates(False)


def test_holdout_error_counts_cross_terms() -> None:
    gram = np.array([[4.0, -1.0, 0.0], [-1.0, 2.0, 1.0], [0.0, 1.0, 3.0]])
    # dropping {0, 1}: 4 + 2 - 2 = 4 out of a total of 9
    assert holdout_error({0: [2]}, {0: gram}) == pytest.approx(4 / 9)
    assert holdout_error({0: [0, 1, 2]}, {0: gram}) == 0.0


class FakeStats:
    def __init__(self, grams: dict[int, np.ndarray], has_holdout: bool) -> None:
        self.layers, self.has_holdout, self._grams = list(grams), has_holdout, grams

    def get(self, layer: int, field: str, holdout: bool = False) -> np.ndarray:
        assert field == "gram" and holdout == self.has_holdout
        return self._grams[layer]


def test_auto_without_holdout_fails_clearly() -> None:
    with pytest.raises(PlanError, match="--holdout"):
        holdout_grams(FakeStats({0: np.eye(2)}, has_holdout=False), [0])


def test_auto_holdout_from_file_or_second_file() -> None:
    own = FakeStats({0: np.eye(2)}, has_holdout=True)
    other = FakeStats({0: 2 * np.eye(2)}, has_holdout=False)
    np.testing.assert_array_equal(holdout_grams(own, [0])[0], np.eye(2))
    np.testing.assert_array_equal(holdout_grams(own, [0], other)[0], 2 * np.eye(2))
    with pytest.raises(PlanError, match=r"lacks layers \[1\]"):
        holdout_grams(own, [0, 1], other)
