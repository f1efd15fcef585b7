"""Criteria against direct implementations of the papers' formulas (docs/criteria.md), on statistics
collected from tiny models: MC-Suite's ECC and ETS pair rules (Sec. 2.3, Eq. 8), EAS (Eqs. 10-11),
MoNE's paper-text frequency term, and free members of the unified family. Nothing here calls
surgery.criteria's code paths except through the `score` command and the registry under test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from surgery.cli import main
from surgery.criteria import LayerInput, get_criterion, oriented


@pytest.fixture(scope="module")
def collect_tiny(tmp_path_factory: pytest.TempPathFactory):
    """collect_tiny(model_type) -> (statistics file, {layer: {field: array}}, n_group) of a tiny model."""
    from tiny_models import build_tiny
    from tiny_tokenizer import save_tiny_tokenizer

    from surgery.collect.run import collect

    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"paper-{model_type}")
            src = build_tiny(model_type, root / "model")
            save_tiny_tokenizer(src, vocab_size=128)
            rng = random.Random(0)
            words = "expert router token layer 42 7 ( ) , the quick brown fox jumps over lazy dog".split()
            data = root / "calib.jsonl"
            data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(24))}) + "\n"
                                    for _ in range(40)))
            out = root / "stats.safetensors"
            collect(src, [str(data)], out, samples=6, seq_len=24, holdout=0, batch_size=2, device="cpu",
                    dtype="float32", progress=False)
            with safe_open(str(out), framework="numpy") as f:
                meta = json.loads(f.metadata()["moe_surgery"])["model"]
                raw = {l: {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"layers.{l}.")}
                       for l in meta["moe_layers"]}
            cache[model_type] = (out, raw, meta.get("n_group"))
        return cache[model_type]

    return get


def plan_of(stats: Path, criterion: str, keep: int, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{criterion.replace(':', '_')}-{keep}-{'-'.join(extra)}.json"
    result = CliRunner().invoke(main, ["score", str(stats), "--criterion", criterion, "--keep", str(keep),
                                       "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# direct implementations of the paper's rules (plain Python over the file's tensors)


def token_id_sets(bits: np.ndarray) -> list[set[int]]:
    """token_bits row i -> the set of token ids v with bit v % 8 of byte v // 8 set."""
    return [{8 * k + b for k in range(bits.shape[1]) for b in range(8) if bits[i, k] >> b & 1}
            for i in range(bits.shape[0])]


def paper_pair_rule(pair_value, usage: list[float], num_keep: int, drop: str, n_group: int | None) -> list[int]:
    """MC-Suite Sec. 2.3: select the pair (p, q) by max (or min) value among the experts still present, drop the
    one with the lower usage frequency, repeat. Conventions as docs/criteria.md states them: never-routed
    experts first (highest id first); pair ties -> first (p, q) in order; usage ties -> the higher id; with
    n_group, each contiguous block drops the same number."""
    num = len(usage)
    groups = n_group if n_group and n_group > 1 else 1
    size = num // groups
    quota = {g: (num - num_keep) // groups for g in range(groups)}
    present = list(range(num))

    def drop_one(e: int) -> None:
        present.remove(e)
        quota[e // size] -= 1

    for e in reversed(range(num)):
        if usage[e] == 0 and quota[e // size] > 0 and len(present) > num_keep:
            drop_one(e)
    while len(present) > num_keep:
        best = None
        for a, p in enumerate(present):
            for q in present[a + 1:]:
                loser = p if usage[p] < usage[q] else q
                if quota[loser // size] == 0:
                    continue
                v = pair_value(p, q)
                if best is None or (v > best[0] if drop == "high" else v < best[0]):
                    best = (v, loser)
        drop_one(best[1])
    return sorted(present)


def paper_ecc_keep(t: dict, num_keep: int, drop: str = "high", n_group: int | None = None) -> list[int]:
    c = t["coselect"]
    return paper_pair_rule(lambda p, q: c[p][q], list(t["count"]), num_keep, drop, n_group)


def paper_ets_keep(t: dict, num_keep: int, drop: str = "high", n_group: int | None = None) -> list[int]:
    sets = token_id_sets(t["token_bits"])
    return paper_pair_rule(lambda p, q: len(sets[p] & sets[q]), list(t["count"]), num_keep, drop, n_group)


def paper_eas(t: dict) -> np.ndarray:
    """Eq. 11 row sums of Eq. 10, sum_{q != p} (1/(|A_p||A_q|)) sum cos(a_m, a_n) = <U_p/n_p, U_q/n_q>; the score
    is negated (drop high, Fig. 12); never routed -> -inf."""
    n, u = t["count"], t["out_unit_sum"]
    num = len(n)
    out = np.empty(num)
    for p in range(num):
        if n[p] == 0:
            out[p] = -np.inf
            continue
        total = 0.0
        for q in range(num):
            if q != p and n[q] > 0:
                total += float(np.dot(u[p] / n[p], u[q] / n[q]))
        out[p] = -total
    return out


def independent_keep(scores: np.ndarray, num_keep: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 9), i))
    return sorted(order[:num_keep])


# ---------------------------------------------------------------------------------------------


def test_old_ecc_reading_is_constant_under_top_k(collect_tiny) -> None:
    """Why the pair rule: sum_{j != i} C_ij / n_i is k - 1 for every routed expert under top-k routing."""
    _, raw, _ = collect_tiny("qwen3_moe")
    for t in raw.values():
        c, n = t["coselect"], t["count"]
        routed = n > 0
        np.testing.assert_allclose(((c.sum(axis=1) - np.diag(c)) / np.where(routed, n, 1))[routed], 1.0)  # top-2


@pytest.mark.parametrize("drop", ["high", "low"])
@pytest.mark.parametrize("keep", [6, 4])
def test_ecc_plan_is_the_papers_pair_rule(drop: str, keep: int, collect_tiny, tmp_path: Path) -> None:
    stats, raw, _ = collect_tiny("qwen3_moe")
    extra = ("--drop", drop) if drop == "low" else ()
    doc = plan_of(stats, "mcs-ecc", keep, tmp_path, *extra)
    for layer, t in raw.items():
        assert doc["keep"][str(layer)] == paper_ecc_keep(t, keep, drop)
    # not constant: the plan is not simply the lowest ids, and scores differ
    assert any(doc["keep"][str(l)] != list(range(keep)) for l in raw)
    assert all(len(set(s)) == 8 for s in doc["scores"].values())


@pytest.mark.parametrize("drop", ["high", "low"])
def test_ets_plan_is_the_papers_pair_rule(drop: str, collect_tiny, tmp_path: Path) -> None:
    stats, raw, _ = collect_tiny("qwen3_moe")
    extra = ("--drop", drop) if drop == "low" else ()
    doc = plan_of(stats, "mcs-ets", 6, tmp_path, *extra)
    for layer, t in raw.items():
        assert doc["keep"][str(layer)] == paper_ets_keep(t, 6, drop)
    assert any(doc["keep"][str(l)] != list(range(6)) for l in raw)


@pytest.mark.parametrize("name,paper", [("mcs-ecc", paper_ecc_keep), ("mcs-ets", paper_ets_keep)])
def test_pair_rules_respect_groups(name: str, paper, collect_tiny, tmp_path: Path) -> None:
    """deepseek_v3 tiny: n_group = 2, so each block of 4 experts keeps 2."""
    stats, raw, n_group = collect_tiny("deepseek_v3")
    assert n_group == 2
    doc = plan_of(stats, name, 4, tmp_path)
    for layer, t in raw.items():
        kept = doc["keep"][str(layer)]
        assert kept == paper(t, 4, "high", n_group)
        assert sum(e < 4 for e in kept) == 2


def test_pair_rule_selector_matches_direct_call(collect_tiny) -> None:
    """The registry's selector and --drop rebuild (oriented) on one layer, without the CLI."""
    _, raw, _ = collect_tiny("qwen3_moe")
    t = next(iter(raw.values()))
    crit = get_criterion("mcs-ecc")
    inp = LayerInput(0, 8, stats=t)
    assert crit.ranker(inp, crit.layer_scores(inp))(5, None) == paper_ecc_keep(t, 5)
    low = oriented(crit, "low")
    assert low.drop == "low" and low.select is not None
    assert low.ranker(inp, low.layer_scores(inp))(5, None) == paper_ecc_keep(t, 5, "low")


def test_eas_is_the_papers_dot_product(collect_tiny, tmp_path: Path) -> None:
    stats, raw, _ = collect_tiny("qwen3_moe")
    doc = plan_of(stats, "mcs-eas", 6, tmp_path)
    for layer, t in raw.items():
        expected = paper_eas(t)
        np.testing.assert_allclose(doc["scores"][str(layer)], expected, rtol=1e-9, atol=1e-12)
        assert doc["keep"][str(layer)] == independent_keep(expected, 6)


def test_mone_paper_uses_the_mean_gate_while_routed(collect_tiny, tmp_path: Path) -> None:
    """MoNE paper text: phi_freq = mean gate over routed tokens; `mone` (official code) divides by all tokens."""
    stats, raw, _ = collect_tiny("qwen3_moe")
    doc = plan_of(stats, "mone-paper", 6, tmp_path)
    code = plan_of(stats, "mone", 6, tmp_path)
    for layer, t in raw.items():
        n, s, q, g = t["count"], t["out_sum"], t["out_sq_sum"], t["moment_g"][1, 0]
        expected = []
        for i in range(len(n)):
            if n[i] <= 1:
                expected.append(-np.inf)
                continue
            var = [(q[i, c] - s[i, c] ** 2 / n[i]) / (n[i] - 1) for c in range(s.shape[1])]
            expected.append(np.sqrt(max(sum(var), 0.0)) * g[i] / n[i])
        np.testing.assert_allclose(doc["scores"][str(layer)], expected, rtol=1e-9)
        # the official code's term differs by n_i / N only: mone * N / n_i == mone-paper
        code_scores = np.array(code["scores"][str(layer)])
        routed = n > 1
        np.testing.assert_allclose(code_scores[routed] * float(t["tokens"][0]) / n[routed],
                                   np.array(expected)[routed], rtol=1e-9)


@pytest.mark.parametrize("name,mab", [("family:1,1,1", (1, 1, 1)), ("family:0.5,1,1", (0.5, 1, 1)),
                                      ("family:2,0,2", (2, 0, 2)), ("family:0,2,1", (0, 2, 1))])
def test_family_free_exponents(name: str, mab: tuple, collect_tiny) -> None:
    """S_i(M, A, B) = sum_t r g^A ||f||^B / n^M straight from moment_g; `family:1,1,1` is REAP.

    Through the registry's lookup (get_criterion): the CLI's --criterion check (surgery/cli/options.py) does
    not accept these names yet."""
    _, raw, _ = collect_tiny("qwen3_moe")
    m, a, b = mab
    crit = get_criterion(name)
    assert crit.name == name and crit.needs == "stats"
    for layer, t in raw.items():
        n, total = t["count"], t["moment_g"][a, b]
        expected = [total[i] / n[i] ** m if n[i] > 0 else (-np.inf if m > 0 else 0.0) for i in range(len(n))]
        scores = crit.layer_scores(LayerInput(layer, len(n), stats=t))
        np.testing.assert_allclose(scores, expected, rtol=1e-12)
        if name == "family:1,1,1":
            np.testing.assert_array_equal(scores, get_criterion("reap").layer_scores(LayerInput(layer, len(n), stats=t)))


@pytest.mark.parametrize("bad", ["family:1,3,1", "family:-1,1,1", "family:1,1", "family:x,1,1", "nope"])
def test_family_names_are_checked(bad: str) -> None:
    from surgery.errors import PlanError

    with pytest.raises(PlanError, match="family:M,A,B"):
        get_criterion(bad)


def test_family_names_from_the_command_line(collect_tiny, tmp_path: Path) -> None:
    """`score --criterion family:1,1,1` is accepted at parse time and keeps what `reap` keeps."""
    stats, raw, _ = collect_tiny("qwen3_moe")
    family = plan_of(stats, "family:1,1,1", 6, tmp_path)
    reap = plan_of(stats, "reap", 6, tmp_path)
    assert family["criterion"] == "family:1,1,1" and family["keep"] == reap["keep"]
    bad = CliRunner().invoke(main, ["score", str(stats), "--criterion", "family:1,3,1", "--keep", "6",
                                    "-o", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "family:M,A,B" in bad.output and not (tmp_path / "bad.json").exists()
