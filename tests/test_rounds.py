"""Iterative (`prune --rounds`) and progressive (`collect --progressive`, `prune --progressive`) pruning:
one round equals one-shot, two rounds equal two hand-made rounds, and progressive statistics equal
statistics collected on the checkpoint the rewriter pruned."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stats_formats import FIELD_BY_NAME, FIELDS, HOLDOUT_FIELDS, StatsFile
from surgery.architectures import get_spec
from surgery.cli import main
from surgery.model.blocks import find_blocks
from surgery.collect.progressive import RouterMask
from surgery.collect.run import collect
from surgery.criteria import CRITERIA
from surgery.errors import PlanError
from surgery.plan import Plan
from surgery.rewrite.experts import rewrite_checkpoint
from surgery.pipeline.rounds import layer_blocks, schedule
from tiny_models import ARCHS, LAYOUTS, add_fake_mtp_layer, build_tiny, checkpoint_bytes, load_model, moe_layers
from tiny_tokenizer import save_tiny_tokenizer

UNSUPPORTED = {"llama4_text"}  # collect refuses it
SUPPORTED = [mt for mt in ARCHS if mt not in UNSUPPORTED]
RUN = dict(samples=4, seq_len=24, holdout=2, batch_size=2, seed=3)
CLI_RUN = ["--samples", "4", "--seq-len", "24", "--holdout", "2", "--batch-size", "2", "--seed", "3",
           "--device", "cpu", "--dtype", "float32"]
TOL = 1e-6
KEEPS = ([0, 3, 4, 6], [1, 2, 5, 7])  # two per block of four: valid for group-limited routers (n_group=2)
KEEP = KEEPS[0]
WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7 ( ) , ;".split()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rounds")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    rng = random.Random(11)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(60)]
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def model(root: Path) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            path = build_tiny(model_type, root / "models" / model_type, layout=LAYOUTS[model_type][0])
            save_tiny_tokenizer(path, vocab_size=128)
            cache[model_type] = path
        return cache[model_type]

    return get


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def pruning(path: Path) -> dict:
    return json.loads((path / "pruning.json").read_text())


def expert_axes(name: str) -> list[int]:
    return [i for i, s in enumerate(FIELD_BY_NAME[name].shape.split(",")) if s == "E"]


def take(arr: np.ndarray, name: str, ids: list[int]) -> np.ndarray:
    for axis in expert_axes(name):
        arr = np.take(arr, ids, axis=axis)
    return arr


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-12)
    return float(np.abs(actual.astype(np.float64) - expected).max() / scale) if actual.size else 0.0


# ---------------------------------------------------------------------------------------------
# Schedules


def test_schedule_spreads_the_remainder_over_the_first_rounds() -> None:
    assert schedule(32, 16, 4) == [28, 24, 20, 16]
    assert schedule(10, 3, 2) == [6, 3]
    assert schedule(8, 2, 3, groups=2) == [6, 4, 2]
    assert schedule(8, 4, 1) == [4]


@pytest.mark.parametrize("args", [(8, 4, 0, 1), (8, 2, 4, 2), (8, 3, 1, 2)])
def test_schedule_refuses_impossible_splits(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(PlanError):
        schedule(*args[:3], groups=args[3])


def test_layer_blocks_cover_every_layer_in_order() -> None:
    assert layer_blocks([0, 2, 3, 5, 6], 2) == [[0, 2, 3], [5, 6]]
    with pytest.raises(PlanError):
        layer_blocks([0, 1], 3)


# ---------------------------------------------------------------------------------------------
# Progressive statistics == statistics of the rewritten checkpoint


def _progressive_case(model: Callable[[str], Path], data_file: Path, root: Path, model_type: str,
                      stream_layers: bool) -> None:
    src = model(model_type)
    layers = moe_layers(src)
    # Every MoE layer (transformers loads uniform checkpoints only): layer l's statistics must see
    # the inputs of the pruned layers above it, and its own routing over the kept experts.
    plan = {layer: KEEPS[i % 2] for i, layer in enumerate(layers)}
    tag = f"{model_type}-{int(stream_layers)}"
    pruned = rewrite_checkpoint(src, Plan(plan), root / f"pruned-{tag}")
    prog = root / f"prog-{tag}.safetensors"
    plain = root / f"plain-{tag}.safetensors"
    collect(src, [str(data_file)], prog, device="cpu", dtype="float32", progress=False, progressive=plan,
            stream_layers=stream_layers, **RUN)
    collect(pruned, [str(data_file)], plain, device="cpu", dtype="float32", progress=False, **RUN)
    a, b = StatsFile(prog), StatsFile(plain)
    assert a.calibration["progressive_plan"] == {str(layer): ids for layer, ids in plan.items()}
    bad = []
    for holdout, names in ((False, [f.name for f in FIELDS]), (True, list(HOLDOUT_FIELDS))):
        for layer in layers:
            ids = pruning(pruned)["expert_map"][str(layer)]
            for name in names:
                ours = a.get(layer, name, holdout=holdout)
                err = rel_err(take(ours, name, ids), b.get(layer, name, holdout=holdout))
                if not err <= TOL:
                    bad.append(f"{'holdout.' if holdout else ''}layer {layer} {name}: {err:.2e}")
            if not holdout:
                dropped = [e for e in range(8) if e not in ids]
                assert not a.get(layer, "count")[dropped].any() and not a.get(layer, "prob_sum")[dropped].any()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_progressive_stats_equal_stats_of_the_rewritten_checkpoint(model_type: str, model, data_file: Path,
                                                                    root: Path) -> None:
    _progressive_case(model, data_file, root, model_type, stream_layers=False)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_progressive_works_with_stream_layers(model_type: str, model, data_file: Path, root: Path) -> None:
    _progressive_case(model, data_file, root, model_type, stream_layers=True)


@pytest.mark.parametrize("model_type", ["phimoe", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_router_mask_changes_the_output_and_restores_the_model(model_type: str, model) -> None:
    """No bias (absent or registered as None), a router bias, a correction bias: all put back."""
    net = load_model(model(model_type))
    spec = get_spec(model_type)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        ref = net(ids).logits
        mask = RouterMask(net, spec, {b.layer: KEEP for b in find_blocks(net, spec)})
        masked = net(ids).logits
        mask.restore()
        after = net(ids).logits
    assert (masked - ref).abs().max() > 1e-4
    assert torch.equal(after, ref)
    state = net.state_dict()
    assert set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)


def test_collect_cli_progressive_flag(model, data_file: Path, root: Path) -> None:
    src = model("qwen3_moe")
    plan = root / "plan.json"
    plan.write_text(json.dumps({"keep": {str(moe_layers(src)[0]): KEEP}}))
    out = root / "cli-prog.safetensors"
    cli("collect", src, "-d", data_file, "-o", out, "--progressive", plan, *CLI_RUN)
    assert StatsFile(out).calibration["progressive_plan"] == {str(moe_layers(src)[0]): KEEP}


# ---------------------------------------------------------------------------------------------
# prune --rounds


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_one_round_equals_one_shot(model_type: str, model, data_file: Path, root: Path) -> None:
    src = model(model_type)
    stats = root / f"oneshot-{model_type}.safetensors"
    cli("collect", src, "-d", data_file, "-o", stats, *CLI_RUN)
    cli("prune", src, "--stats", stats, "--criterion", "recon", "--ratio", "0.5", "-o", root / f"oneshot-{model_type}")
    cli("prune", src, "-d", data_file, "--criterion", "recon", "--ratio", "0.5", "--rounds", "1", *CLI_RUN,
        "-o", root / f"r1-{model_type}")
    one, r1 = pruning(root / f"oneshot-{model_type}"), pruning(root / f"r1-{model_type}")
    assert r1["expert_map"] == one["expert_map"]
    assert r1["plan"]["rounds"][0]["plan"]["keep"] == one["plan"]["keep"]
    assert checkpoint_bytes(root / f"r1-{model_type}") == checkpoint_bytes(root / f"oneshot-{model_type}")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_two_rounds_equal_two_rounds_by_hand(model_type: str, model, data_file: Path, root: Path) -> None:
    src = model(model_type)
    out = root / f"r2-{model_type}"
    log = cli("prune", src, "-d", data_file, "--criterion", "gated_sq", "--ratio", "0.5", "--rounds", "2", *CLI_RUN,
              "-o", out)
    assert "peak temporary disk use" in log
    hand = root / f"hand-{model_type}"
    current = src
    for r, keep in enumerate([6, 4]):
        stats = hand / f"s{r}.safetensors"
        stats.parent.mkdir(exist_ok=True)
        cli("collect", current, "-d", data_file, "-o", stats, *CLI_RUN)
        cli("prune", current, "--stats", stats, "--criterion", "gated_sq", "--keep", keep, "-o", hand / f"m{r}")
        current = hand / f"m{r}"
    m0, m1, got = pruning(hand / "m0"), pruning(hand / "m1"), pruning(out)
    composed = {layer: [m0["expert_map"][layer][i] for i in ids] for layer, ids in m1["expert_map"].items()}
    assert got["expert_map"] == composed
    assert [r["keep_per_layer"] for r in got["plan"]["rounds"]] == [6, 4]
    assert [r["plan"]["keep"] for r in got["plan"]["rounds"]] == [m0["plan"]["keep"], m1["plan"]["keep"]]
    assert checkpoint_bytes(out) == checkpoint_bytes(current)
    assert not list(root.glob(".rounds-*")), "temporary folder left behind"


def test_prune_progressive_records_layer_blocks(model, data_file: Path, root: Path) -> None:
    src = model("qwen2_moe")
    out = root / "progressive"
    cli("prune", src, "-d", data_file, "--criterion", "recon", "--keep", "4", "--rounds", "2", "--progressive",
        *CLI_RUN, "-o", out)
    info = pruning(out)
    layers = moe_layers(src)
    assert [r["layers"] for r in info["plan"]["rounds"]] == layer_blocks(layers, 2)
    for r in info["plan"]["rounds"]:
        for layer in r["layers"]:
            assert info["expert_map"][str(layer)] == r["plan"]["keep"][str(layer)]
    assert info["num_experts_after"] == 4


@pytest.fixture(scope="module")
def first_round_stats(model, data_file: Path, root: Path) -> Callable[[str], Path]:
    """What round 1 collects on the unpruned qwen3_moe, collected by hand through the CLI; the argument is the
    extra collect option the criterion's statistics need ("" for none)."""
    cache: dict[str, Path] = {}

    def get(option: str) -> Path:
        if option not in cache:
            cache[option] = root / f"first-round{option}.safetensors"
            cli("collect", model("qwen3_moe"), "-d", data_file, "-o", cache[option], *CLI_RUN, *filter(None, [option]))
        return cache[option]

    return get


def score_by_hand(criterion: str, src: Path, stats: Callable[[str], Path], keep: int, root: Path) -> dict:
    """`moe-surgery score` as round 1 runs it: on the statistics, or on the checkpoint for criteria without."""
    if CRITERIA[criterion].needs == "stats":
        option = "--gradients" if criterion.startswith("mcs-eg") else "--histogram" if criterion == "mcs-eao" else ""
        source = [stats(option)]
    else:
        source = ["--model", src]
    plan = root / f"hand-score-{criterion}-{keep}.json"
    cli("score", *source, "--criterion", criterion, "--keep", keep, "--seed", "3", "-o", plan)
    return json.loads(plan.read_text())


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("mode", ["--rounds", "--progressive"])
def test_every_criterion(criterion: str, mode: str, model, data_file: Path, root: Path,
                         first_round_stats: Callable[[str], Path]) -> None:
    """Round 1 decides what `score` decides by hand on the same statistics; the output is the rewrite of the
    composed plan, which `prune --plan` by hand reproduces byte for byte."""
    if mode == "--progressive" and CRITERIA[criterion].needs != "stats":
        pytest.skip("progressive pruning re-collects statistics: weight-only criteria do not change")
    src = model("qwen3_moe")
    out = root / f"every-{criterion}{mode}"
    extra = ["--progressive"] if mode == "--progressive" else []
    cli("prune", src, "-d", data_file, "--criterion", criterion, "--ratio", "0.5", "--rounds", "2", *extra,
        *CLI_RUN, "-o", out)
    info = pruning(out)
    rounds = info["plan"]["rounds"]
    layers = [str(layer) for layer in moe_layers(src)]
    first = rounds[0]["plan"]
    hand = score_by_hand(criterion, src, first_round_stats, 4 if extra else 6, root)
    if extra:  # round r decides block r's layers for good, the first one on the unpruned model's statistics
        assert [r["layers"] for r in rounds] == layer_blocks(moe_layers(src), 2)
        for layer in map(str, rounds[0]["layers"]):
            assert first["keep"][layer] == hand["keep"][layer] and first["scores"][layer] == hand["scores"][layer]
        composed = {str(layer): r["plan"]["keep"][str(layer)] for r in rounds for layer in r["layers"]}
    else:  # 8 -> 6 -> 4 experts; round 2's ids are positions among round 1's kept experts
        assert [r["keep_per_layer"] for r in rounds] == [6, 4]
        assert first["keep"] == hand["keep"] and first["scores"] == hand["scores"]
        second = rounds[1]["plan"]["keep"]
        assert all(set(second[layer]) <= set(range(6)) for layer in layers)
        composed = {layer: [first["keep"][layer][i] for i in second[layer]] for layer in layers}
    assert info["expert_map"] == composed and sorted(composed) == sorted(layers)
    assert all(len(set(ids)) == 4 and ids == sorted(ids) and set(ids) <= set(range(8)) for ids in composed.values())
    plan = root / f"every-{criterion}{mode}.json"
    plan.write_text(json.dumps({"keep": composed}))
    cli("prune", src, "--plan", plan, "-o", root / f"every-{criterion}{mode}-by-hand")
    assert checkpoint_bytes(out) == checkpoint_bytes(root / f"every-{criterion}{mode}-by-hand")


def test_bad_combinations_are_one_line_errors(model, data_file: Path, root: Path) -> None:
    src = model("qwen3_moe")
    runner = CliRunner()
    for args in (["--stats", "x.safetensors", "-d", data_file], ["--rounds", "2"], ["-d", data_file, "--rounds", "9"]):
        result = runner.invoke(main, ["prune", str(src), "--criterion", "recon", "--ratio", "0.5", "-o",
                                      str(root / "bad"), *map(str, args)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error:") and result.output.count("\n") == 1, result.output


def test_novices_one_round_equals_one_shot_and_rounds_keep_the_composed_plan(model, data_file: Path,
                                                                              root: Path) -> None:
    src = model("qwen3_moe")
    stats = root / "novice-oneshot.safetensors"
    cli("collect", src, "-d", data_file, "-o", stats, *CLI_RUN)
    cli("prune", src, "--stats", stats, "--criterion", "recon", "--ratio", "0.5", "--novices", "-o", root / "nov1")
    cli("prune", src, "-d", data_file, "--criterion", "recon", "--ratio", "0.5", "--rounds", "1", "--novices",
        *CLI_RUN, "-o", root / "nov-r1")
    assert checkpoint_bytes(root / "nov-r1") == checkpoint_bytes(root / "nov1")
    cli("prune", src, "-d", data_file, "--criterion", "recon", "--ratio", "0.5", "--rounds", "2", "--novices",
        *CLI_RUN, "-o", root / "nov-r2")
    cli("prune", src, "-d", data_file, "--criterion", "recon", "--ratio", "0.5", "--rounds", "2", *CLI_RUN,
        "-o", root / "plain-r2")
    assert pruning(root / "nov-r2")["plan"]["keep"] == pruning(root / "plain-r2")["expert_map"]


def test_rounds_on_a_checkpoint_with_an_mtp_layer(data_file: Path, root: Path) -> None:
    """MTP layers are never run (no statistics): they follow the last main layer in every round."""
    src = build_tiny("deepseek_v3", root / "mtp-src")
    save_tiny_tokenizer(src, vocab_size=128)
    mtp = add_fake_mtp_layer(src)
    out = root / "mtp-r2"
    cli("prune", src, "-d", data_file, "--criterion", "gated_sq", "--ratio", "0.5", "--rounds", "2", *CLI_RUN,
        "-o", out)
    expert_map = pruning(out)["expert_map"]
    assert expert_map[str(mtp)] == expert_map[str(max(moe_layers(src)))]
