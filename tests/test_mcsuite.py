"""MC-Suite criteria (surgery.criteria.mcsuite) on hand-made weights and statistics with known answers,
the drop direction (`oriented`, `--drop`) and its refusal for set selectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open
from stats_factory import default_calibration, default_model, make_stats

from stats_formats import StatsFile
from surgery.cli import main
from surgery.criteria import AUTO, CRITERIA, LayerInput
from surgery.criteria import default_drop, oriented
from surgery.criteria.mcsuite import SIGNALS
from surgery.errors import PlanError
from surgery.plan.select import make_plan

INF = np.inf
MCS = ["mcs-ewn", "mcs-wsr", "mcs-ews", "mcs-rwn", "mcs-euf", "mcs-ecc", "mcs-evtc", "mcs-ets", "mcs-ean", "mcs-eae",
       "mcs-eas", "mcs-eao"]
DROP_HIGH = ("mcs-wsr", "mcs-ews", "mcs-rwn", "mcs-ecc", "mcs-ets", "mcs-eas")  # docs/criteria.md
PAIR_RULE = ("mcs-ecc", "mcs-ets")


def score(name: str, num_experts: int, stats: dict | None = None, weights=None) -> np.ndarray:
    return CRITERIA[name].layer_scores(LayerInput(0, num_experts, stats=stats, weights=weights))


def score_cli(*args: object) -> Result:
    """`moe-surgery score ARGS` through the top-level command."""
    return CliRunner().invoke(main, ["score", *map(str, args)])


def keep_of_selector(crit, num_experts: int, num_keep: int, n_group: int | None = None, **inputs) -> list[int]:
    """The kept set of a set selector (a criterion or its name) through make_plan."""
    crit = CRITERIA[crit] if isinstance(crit, str) else crit
    inp = LayerInput(0, num_experts, **inputs)
    return make_plan({0: crit.ranker(inp, crit.layer_scores(inp))}, num_experts, 1, keep=num_keep, groups=n_group)[0]


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
        assert (crit.select is not None) == (name in PAIR_RULE) and crit.formula and "\n" not in crit.formula
    lines = CliRunner().invoke(main, ["criteria"]).output.splitlines()
    listed = {line.split()[0] for line in lines}
    assert set(MCS) <= listed


def test_ewn() -> None:
    np.testing.assert_allclose(score("mcs-ewn", 3, weights=WEIGHTS), [np.sqrt(31.0), np.sqrt(6.0), 0.0])
    assert CRITERIA["mcs-ewn"].needs == "weights"


def test_wsr() -> None:
    # stable ranks: E0 (25/16, 2, 1), E1 (1, 2, zero matrix 0), E2 all 0
    # drop high (finding 4: dominant experts have lower stable rank), so the score is the negated signal
    np.testing.assert_allclose(score("mcs-wsr", 3, weights=WEIGHTS), [-(25 / 16 + 3) / 3, -1.0, 0.0])


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


# top-2 routing of 7 tokens: {0,1} x3, {0,2}, {2,3} x2, {1,3}: n = (4, 4, 3, 3)
ECC_STATS = {"count": np.array([4.0, 4.0, 3.0, 3.0]),
             "coselect": np.array([[4.0, 3, 1, 0], [3, 4, 0, 1], [1, 0, 3, 2], [0, 1, 2, 3]])}


def test_ecc_pair_rule() -> None:
    # high: pair (0,1) C=3, equal usage -> drop 1; then (2,3) C=2 -> drop 3; then (0,2) -> drop 2 (n 3 < 4)
    np.testing.assert_array_equal(score("mcs-ecc", 4, stats=ECC_STATS), [3.0, 0.0, 2.0, 1.0])
    assert keep_of_selector("mcs-ecc", 4, 2, stats=ECC_STATS) == [0, 2]
    # low: pairs (0,3) and (1,2) have C=0, (0,3) first -> drop 3; then (1,2) -> drop 2; then (0,1) -> drop 1
    low = oriented(CRITERIA["mcs-ecc"], "low")
    np.testing.assert_array_equal(low.layer_scores(LayerInput(0, 4, stats=ECC_STATS)), [3.0, 2.0, 1.0, 0.0])
    assert keep_of_selector(low, 4, 2, stats=ECC_STATS) == [0, 1]
    # never routed first, whatever the direction
    np.testing.assert_array_equal(score("mcs-ecc", 3, stats=STATS), [2.0, 1.0, 0.0])


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
    # Eqs. 10-11: sum_{q != p} <U_p/n_p, U_q/n_q>, means (1,0), (0,1), (1,1), none: not renormalised
    expected = [-1.0, -1.0, -2.0, -INF]
    np.testing.assert_allclose(score("mcs-eas", 4, stats=EAS_STATS), expected)
    assert keep_of("mcs-eas", 4, 2, stats=EAS_STATS) == [0, 1]  # never routed first, then the most similar


class RouterOnly:
    """Layer weights with a router [E, H] and no readable expert matrices."""

    def __init__(self, router: list) -> None:
        self._router = np.asarray(router, dtype=np.float32)

    def __call__(self, expert: int) -> dict[str, np.ndarray]:
        raise AssertionError("a router criterion must not read expert matrices")

    def router(self) -> np.ndarray:
        return self._router


def test_rwn_is_the_router_row_norm() -> None:
    # Max-RWN (Table 1): drop high, so the score is the negated norm
    np.testing.assert_allclose(score("mcs-rwn", 3, weights=RouterOnly([[3, 4], [0, 0], [1, 0]])), [-5.0, 0.0, -1.0])
    assert CRITERIA["mcs-rwn"].needs == "weights"
    with pytest.raises(ValueError, match="router weights"):
        score("mcs-rwn", 3, weights=WEIGHTS)  # matrices without a router


def bit_sets(*id_sets: set[int], vocab: int = 44) -> np.ndarray:
    """token_bits [E, ceil(vocab / 8)] (uint8) of the given token-id sets: bit v % 8 of byte v // 8."""
    out = np.zeros((len(id_sets), -(-vocab // 8)), dtype=np.uint8)
    for e, ids in enumerate(id_sets):
        for v in ids:
            out[e, v // 8] |= 1 << (v % 8)
    return out


# expert 0 saw ids {0, 1, 33}, expert 1 {1}, expert 2 nothing, expert 3 {40}
TOKENS = {"token_bits": bit_sets({0, 1, 33}, {1}, set(), {40}), "count": np.array([3.0, 1.0, 0.0, 1.0])}


def test_token_bits_layout() -> None:
    np.testing.assert_array_equal(TOKENS["token_bits"][:, [0, 4, 5]], [[3, 2, 0], [2, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert TOKENS["token_bits"].shape == (4, 6)


def test_evtc_is_the_share_of_seen_token_ids() -> None:
    np.testing.assert_allclose(score("mcs-evtc", 4, stats=TOKENS), [3 / 4, 1 / 4, 0.0, 1 / 4])
    np.testing.assert_array_equal(score("mcs-evtc", 2, stats={"token_bits": bit_sets(set(), set())}), [0.0, 0.0])


def test_ets_pair_rule_on_shared_token_ids() -> None:
    # shared ids: only 0 and 1 share one ({1}); expert 2 never routed goes first
    # high: pair (0,1) -> drop the less used 1; then (0,3) -> drop 3
    np.testing.assert_array_equal(score("mcs-ets", 4, stats=TOKENS), [3.0, 1.0, 0.0, 2.0])
    assert keep_of_selector("mcs-ets", 4, 2, stats=TOKENS) == [0, 3]
    # low: pair (0,3) shares nothing, first -> drop 3; then (0,1) -> drop 1
    low = oriented(CRITERIA["mcs-ets"], "low")
    np.testing.assert_array_equal(low.layer_scores(LayerInput(0, 4, stats=TOKENS)), [3.0, 2.0, 0.0, 1.0])
    assert keep_of_selector(low, 4, 2, stats=TOKENS) == [0, 1]


def hist_of(*values: list[float]) -> np.ndarray:
    """out_hist [E, 513] of values that lie on grid points (s = sign(v) (8 log2|v| + 128), an integer)."""
    out = np.zeros((len(values), 513))
    for e, vs in enumerate(values):
        for v in vs:
            out[e, round(np.sign(v) * (8 * np.log2(abs(v)) + 128)) + 256] += 1
    return out


def test_eao_counts_values_beyond_three_sigma() -> None:
    # expert 0 (10 tokens, H = 2): channel 0 = five 1s and five -1s, channel 1 = five 1s, four -1s and 16;
    # over all 20 values mu = 0.85, sigma = 3.61: only 16 lies outside [-9.98, 11.68].
    # expert 1 (2 tokens): values +-1, mu = 0, sigma = 1: none outside +-3. Expert 2 never routed.
    ch0, ch1 = [1.0] * 5 + [-1.0] * 5, [1.0] * 5 + [-1.0] * 4 + [16.0]
    stats = {
        "count": np.array([10.0, 2.0, 0.0]),
        "out_sum": np.array([[sum(ch0), sum(ch1)], [0.0, 0.0], [0.0, 0.0]]),
        "out_sq_sum": np.array([[sum(v * v for v in ch0), sum(v * v for v in ch1)], [2.0, 2.0], [0.0, 0.0]]),
        "out_hist": hist_of(ch0 + ch1, [1.0, -1.0, -1.0, 1.0], []),
    }
    np.testing.assert_allclose(score("mcs-eao", 3, stats=stats), [1.0, 0.0, -INF])
    # the upper threshold (grid coordinate 156.37) inside the step from point 156 to 157 counts part of a
    # value whose weight sits on both points (bins 412 and 413)
    split = dict(stats, out_hist=stats["out_hist"].copy())
    split["out_hist"][0, 416] = 0.0
    split["out_hist"][0, [412, 413]] = 0.5
    assert 0.0 < score("mcs-eao", 3, stats=split)[0] < 1.0


@pytest.mark.parametrize("name,field,option", [("mcs-evtc", "token_bits", "`"), ("mcs-ets", "token_bits", "`"),
                                               ("mcs-eao", "out_hist", " --histogram`")])
def test_missing_mcsuite_field_says_to_recollect(name: str, field: str, option: str) -> None:
    with pytest.raises(PlanError, match=f"no {field}: re-run `moe-surgery collect MODEL -d DATA{option}") as excinfo:
        score(name, 3, stats=STATS)
    assert "\n" not in str(excinfo.value)


def test_default_directions() -> None:
    assert {n: default_drop(n) for n in MCS} == {n: "high" if n in DROP_HIGH else "low" for n in MCS}
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
    eas_low = oriented(CRITERIA["mcs-eas"], "low").layer_scores(LayerInput(0, 4, stats=EAS_STATS))
    np.testing.assert_allclose(eas_low, [1.0, 1.0, 2.0, -INF])
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
        result = score_cli(stats, "--criterion", "mcs-ean", "--ratio", "0.5", "-o", out, *extra)
        assert result.exit_code == 0, result.output
        docs[drop] = json.loads(out.read_text())
    assert "drop" not in docs[None] and docs["low"]["drop"] == "low" and docs["high"]["drop"] == "high"
    assert docs[None]["keep"] == docs["low"]["keep"]
    for layer, kept in docs["low"]["keep"].items():
        assert sorted(kept + docs["high"]["keep"][layer]) == list(range(8))  # opposite halves
        assert docs["high"]["scores"][layer] == [-s for s in docs["low"]["scores"][layer]]


def test_score_drop_refused_for_recon(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "s.safetensors")
    result = score_cli(stats, "--criterion", "recon", "--drop", "low", "--ratio", "0.5", "-o", tmp_path / "p.json")
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


# ---------------------------------------------------------------------------------------------
# End to end: statistics collected from a tiny model, router weights read from its checkpoint


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny qwen3_moe with a tokenizer, its statistics file)."""
    import random

    from tiny_models import build_tiny
    from tiny_tokenizer import save_tiny_tokenizer

    from surgery.collect.run import collect

    root = tmp_path_factory.mktemp("mcsuite")
    src = build_tiny("qwen3_moe", root / "model")
    save_tiny_tokenizer(src, vocab_size=128)
    rng = random.Random(0)
    vocabulary = "expert router token layer 42 7 ( ) , the quick brown fox".split()
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(20))}) + "\n"
                            for _ in range(30)))
    out = root / "stats.safetensors"
    collect(src, [str(data)], out, samples=4, seq_len=24, holdout=0, batch_size=2, device="cpu", dtype="float32",
            progress=False, histogram=True)
    return src, out


# Independent computations of two signals, straight from the file's tensors as docs/stats-format.md and
# README define them (nothing from surgery.criteria): the CLI must keep exactly the experts they keep.


def independent_token_sets(bits: np.ndarray) -> np.ndarray:
    """[E, 8 B] bool: bit b (value 2^b) of byte k of row i is token id 8 k + b."""
    sets = np.zeros((bits.shape[0], 8 * bits.shape[1]), dtype=bool)
    for b in range(8):
        sets[:, b::8] = (bits >> b) & 1
    return sets


def independent_evtc(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """|T_i| / |union_j T_j|; drop low, so the score is the signal."""
    sets = independent_token_sets(tensors["token_bits"])
    return np.array([row.sum() for row in sets]) / np.logical_or.reduce(sets).sum()


def independent_eao(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Routed output values beyond mu_i +- 3 sigma_i (mu, sigma over all n_i H values), counted on out_hist.

    Grid coordinate s(v) = sign(v) clip(8 log2|v| + 128, 0, 256); bin j holds grid point j - 256. A bin's
    weight is taken as spread evenly over +- half a step, so the mass beyond a threshold at coordinate c is
    sum_p h_p clip(p + 1/2 - c, 0, 1). Together with the collector's linear split of each value this smooths
    the density by variance 1/12 + 1/6 (steps^2); the tail mass of a density smoothed by variance v is off by
    v/2 f'(c), which the histogram's central-difference slope at c puts back.
    """
    n, hist = tensors["count"], tensors["out_hist"]
    num, width = tensors["out_sum"].shape
    points = np.arange(hist.shape[1]) - hist.shape[1] // 2
    half_v = (1 / 12 + 1 / 6) / 2
    out = np.empty(num)
    for i in range(num):
        if n[i] == 0:
            out[i] = -INF
            continue
        values = n[i] * width
        mu = tensors["out_sum"][i].sum() / values
        sigma = np.sqrt(max(tensors["out_sq_sum"][i].sum() / values - mu**2, 0.0))
        h = hist[i]
        slope = np.concatenate([[h[1] - h[0]], (h[2:] - h[:-2]) / 2, [h[-1] - h[-2]]])

        def coord(v: float) -> float:
            return float(np.sign(v) * np.clip(8 * np.log2(abs(v)) + 128, 0, 256)) if v else 0.0

        hi, lo = coord(mu + 3 * sigma), coord(mu - 3 * sigma)
        above = (h * np.clip(points + 0.5 - hi, 0, 1)).sum() + half_v * np.interp(hi, points, slope)
        below = (h * np.clip(lo - (points - 0.5), 0, 1)).sum() - half_v * np.interp(lo, points, slope)
        out[i] = max(above, 0.0) + max(below, 0.0) if sigma > 0 else 0.0
    return out


def independent_keep(scores: np.ndarray, num_keep: int) -> list[int]:
    """The documented plan rule: higher score first, then lower id (scores equal to 1e-9 are tied)."""
    order = sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 9), i))
    return sorted(order[:num_keep])


INDEPENDENT = {"mcs-evtc": independent_evtc, "mcs-eao": independent_eao}  # ETS, ECC, EAS: tests/test_criteria_paper.py


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_score_cli_on_collected_statistics(name: str, collected: tuple[Path, Path], tmp_path: Path) -> None:
    _, stats_path = collected
    out = tmp_path / "plan.json"
    result = score_cli(stats_path, "--criterion", name, "--ratio", "0.25", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    with safe_open(str(stats_path), framework="numpy") as f:
        layers = json.loads(f.metadata()["moe_surgery"])["model"]["moe_layers"]
        raw = {layer: {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"layers.{layer}.")}
               for layer in layers}
    assert sorted(doc["keep"]) == sorted(map(str, layers))
    for layer in layers:
        expected = INDEPENDENT[name](raw[layer])
        np.testing.assert_allclose(doc["scores"][str(layer)], expected, rtol=1e-9, atol=1e-12)
        assert doc["keep"][str(layer)] == independent_keep(expected, 6)
    sets = raw[layers[0]]["token_bits"]
    assert sets.any() and sets.shape == (8, 16) and sets.dtype == np.uint8  # vocabulary 128: 16 bytes


def test_score_cli_refuses_statistics_without_the_field(tmp_path: Path) -> None:
    """A file from before the MC-Suite statistics (the factory writes none) stays readable; the criterion says why not."""
    stats = write_stats(tmp_path / "old.safetensors")
    assert StatsFile(stats).optional_fields == ()
    result = score_cli(stats, "--criterion", "mcs-evtc", "--ratio", "0.5", "-o", tmp_path / "p.json")
    assert result.exit_code == 2
    assert result.output.startswith("Error:") and result.output.count("\n") == 1
    assert "token_bits" in result.output and "moe-surgery collect" in result.output


@pytest.mark.parametrize("model_type,layout", [("qwen3_moe", "per-expert"), ("deepseek_v3", "per-expert"),
                                               ("gpt_oss", "fused"), ("granitemoe", "fused")])
def test_rwn_reads_the_checkpoint_router(model_type: str, layout: str, tiny, tmp_path: Path) -> None:
    """Router rows as transformers loads them (biases and correction terms are not rows)."""
    from collect_reference import ROUTER_ATTR, find_moe_blocks
    from tiny_models import load_model

    src = tiny(model_type, layout)
    out = tmp_path / "plan.json"
    result = score_cli("--model", src, "--criterion", "mcs-rwn", "--keep", "4", "-o", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["scores"]
    blocks = find_moe_blocks(load_model(src))
    assert sorted(map(int, scores)) == sorted(blocks)
    for layer, block in blocks.items():
        router = getattr(block, ROUTER_ATTR.get(model_type, "gate")).weight.detach().double().numpy()
        np.testing.assert_allclose(scores[str(layer)], -np.linalg.norm(router, axis=1), rtol=1e-6)  # Max-RWN
