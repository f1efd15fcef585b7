"""Gradient statistics (`collect --gradients`) and the MC-Suite gradient criteria (mcs-egs/ege/ego/egn).

The collector's fields against a plain `loss.backward()` per sequence on tiny models (also with
--stream-layers); `--gradients accumulated` and each criterion of both forms against the paper's
formulas computed directly from `loss.backward()` gradients; torchrun with 2 ranks and `stats merge`
of two data shards against one run (an accumulated file is refused by merge, and exact under
torchrun); each criterion on hand-made statistics with a known answer; a file without gradients gives
a clear error."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from collect_reference import find_moe_blocks
from tiny_models import LAYOUTS, build_tiny, load_model
from tiny_tokenizer import save_tiny_tokenizer
from transformers import AutoTokenizer

from stats_formats import StatsError, StatsFile, merge
from stats_formats.schema import GRADIENT_FIELDS, field_table_markdown
from surgery.architectures import get_spec
from surgery.collect.gradients import gradient_pass
from surgery.collect.run import collect
from surgery.criteria import CRITERIA, LayerInput
from surgery.criteria import default_drop, oriented
from surgery.model.data import build_sequences
from surgery.errors import PlanError

REPO = Path(__file__).resolve().parents[1]
SEQ = 16
RUN = dict(samples=2, seq_len=SEQ, holdout=1, batch_size=2, seed=3)
GRAD = [f.name for f in GRADIENT_FIELDS]
EGS = ["mcs-egs", "mcs-ege", "mcs-ego", "mcs-egn"]
REF_TOL = 1e-6  # collector vs per-sequence loss.backward(), both float32 models
SAME_TOL = 1e-9  # the same float32 gradients summed in another order


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gradients")


@pytest.fixture(scope="module")
def model(root: Path) -> Callable[[str], Path]:
    """`model(model_type)`: a tiny checkpoint with the character tokenizer, built once."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            path = build_tiny(model_type, root / model_type, layout=LAYOUTS[model_type][0])
            save_tiny_tokenizer(path, vocab_size=min(256, json.loads((path / "config.json").read_text())["vocab_size"]))
            cache[model_type] = path
        return cache[model_type]

    return get


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGH") for _ in range(n))


def _write_rows(path: Path, rows: list[str], seed: int) -> Path:
    """A data file whose packed sequences are exactly `row + EOS` for each row (rows of SEQ - 1 characters,
    one token each): the file order is the one build_sequences' seeded shuffle turns into rows + [filler]."""
    desired = rows + ["filler"]
    perm = list(range(len(desired)))
    random.Random(seed).shuffle(perm)
    docs = [""] * len(desired)
    for j, i in enumerate(perm):
        docs[i] = desired[j]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def rows() -> list[str]:
    rng = random.Random(5)
    return [_letters(rng, SEQ - 1) for _ in range(4)]


@pytest.fixture(scope="module")
def data(root: Path, rows: list[str]) -> Path:
    return _write_rows(root / "calib.jsonl", rows, RUN["seed"])


def run(src: Path, data: Path, out: Path, **kw) -> StatsFile:
    args = {**RUN, "gradients": "per-sequence", **kw}
    collect(src, [str(data)], out, device="cpu", dtype="float32", progress=False, **args)
    return StatsFile(out)


@pytest.fixture(scope="module")
def collected(model, data: Path, root: Path) -> Callable[[str, bool], StatsFile]:
    """`collected(model_type, stream_layers)`: `collect --gradients` with RUN, once per module."""
    cache: dict[tuple[str, bool], StatsFile] = {}

    def get(model_type: str, stream: bool) -> StatsFile:
        if (model_type, stream) not in cache:
            out = root / f"{model_type}-{'stream' if stream else 'memory'}.safetensors"
            cache[model_type, stream] = run(model(model_type), data, out, stream_layers=stream)
        return cache[model_type, stream]

    return get


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def assert_same(actual: StatsFile, expected: dict[int, dict[str, np.ndarray]], tol: float, names=GRAD) -> None:
    assert actual.layers == sorted(expected)
    bad = [f"layer {layer} {name}: {rel_err(actual.get(layer, name), expected[layer][name]):.2e}"
           for layer in actual.layers for name in names
           if not rel_err(actual.get(layer, name), expected[layer][name]) <= tol]
    assert not bad, "\n".join(bad)


def as_expected(stats: StatsFile, names=GRAD) -> dict[int, dict[str, np.ndarray]]:
    return {layer: {n: stats.get(layer, n) for n in names} for layer in stats.layers}


# ---------------------------------------------------------------------------------------------
# 1. Against a plain loss.backward()


def _expert_matrices(experts: torch.nn.Module, e: int, model_type: str) -> list[np.ndarray]:
    """Expert e's gradients as [rows, H] matrices (hidden dimension j = column j), written out per layout."""
    gu, down = experts.gate_up_proj.grad[e].double().numpy(), experts.down_proj.grad[e].double().numpy()
    if model_type == "gpt_oss":  # [H, 2I] and [I, H]
        return [gu.T, down]
    return [gu, down.T]  # [2I, H] and [H, I]


def reference(src: Path, ids: torch.Tensor) -> dict[int, dict[str, np.ndarray]]:
    """Every gradient field from `loss.backward()` on each sequence alone, with the model's own loss
    (a mean over the T-1 predicted tokens, times T-1 for the sum)."""
    model = load_model(src)
    blocks = find_moe_blocks(model)
    sums: dict[int, dict[str, np.ndarray]] = {}
    for row in ids:
        model.zero_grad(set_to_none=True)
        (model(input_ids=row[None], labels=row[None]).loss * (row.numel() - 1)).backward()
        for layer, block in blocks.items():
            experts = block.experts
            mats = [_expert_matrices(experts, e, model.config.model_type) for e in range(experts.gate_up_proj.shape[0])]
            flat = np.stack([np.concatenate([m.ravel() for m in ms]) for ms in mats])
            mean, std = flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True)
            fields = {
                "grad_hidden_count": np.array([float(sum(m.shape[0] for m in mats[0]))]),
                "grad_gram": flat @ flat.T,
                "grad_hidden_sum": np.stack([sum(m.sum(axis=0) for m in ms) for ms in mats]),
                "grad_hidden_sq_sum": np.stack([sum((m * m).sum(axis=0) for m in ms) for ms in mats]),
                "grad_outliers": (np.abs(flat - mean) > 3 * std).sum(axis=1).astype(np.float64),
            }
            acc = sums.setdefault(layer, {k: np.zeros_like(v) for k, v in fields.items()})
            for k, v in fields.items():
                acc[k] += v
    return sums


def main_ids(src: Path, data: Path, samples: int) -> torch.Tensor:
    return build_sequences([str(data)], AutoTokenizer.from_pretrained(src), samples, SEQ, RUN["seed"]).input_ids


@pytest.mark.parametrize(("model_type", "stream"), [("qwen3_moe", False), ("qwen3_moe", True), ("gpt_oss", False)],
                         ids=["qwen3_moe", "qwen3_moe-stream-layers", "gpt_oss"])
def test_matches_plain_backward(model_type: str, stream: bool, model, data: Path, collected) -> None:
    """Two layouts of the expert matrices (gpt_oss: transposed, interleaved, with biases); qwen3_moe has a
    dense layer between its MoE layers, which the streamed backward walk passes the gradient through."""
    src = model(model_type)
    stats = collected(model_type, stream)
    expected = reference(src, main_ids(src, data, RUN["samples"]))
    assert set(GRAD) <= set(stats.optional_fields)
    assert_same(stats, expected, REF_TOL)
    for layer in stats.layers:  # not trivial: most experts got a gradient, and some entries are outliers
        assert (np.diag(stats.get(layer, "grad_gram")) > 0).mean() > 0.5
        assert stats.get(layer, "grad_outliers").sum() > 0
        assert stats.get(layer, "grad_hidden_count")[0] == RUN["samples"] * 3 * 32  # holdout sequences excluded


def _gradients(src: Path, ids: torch.Tensor, accumulated: bool) -> dict[int, list[np.ndarray]]:
    """{layer: [G_(s,)i as [3I, H] stacked over experts]} per sequence, or one entry of the summed loss's gradient."""
    model = load_model(src)
    blocks = find_moe_blocks(model)
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in blocks}
    groups = [ids] if accumulated else [row[None] for row in ids]
    for rows in groups:
        model.zero_grad(set_to_none=True)
        sum((model(input_ids=r[None], labels=r[None]).loss * (r.numel() - 1)) for r in rows).backward()
        for layer, block in blocks.items():
            e_count = block.experts.gate_up_proj.shape[0]
            mats = [_expert_matrices(block.experts, e, model.config.model_type) for e in range(e_count)]
            out[layer].append(np.stack([np.concatenate(ms, axis=0) for ms in mats]))  # [E, 3I, H]
    return out


def paper_signals(grads: list[np.ndarray]) -> dict[str, np.ndarray]:
    """MC-Suite Eqs. 14-16 and Sec. 2.5 written out: one gradient per expert when `grads` has one entry (the
    paper's accumulated form); with several (per sequence), sums of the per-sequence quantities as documented."""
    flats = [g.reshape(g.shape[0], -1) for g in grads]
    gram = sum(f @ f.T for f in flats)
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / np.outer(norms, norms)
    e = len(norms)
    pooled = np.concatenate(grads, axis=1)  # [E, S*3I, H]: hidden dimension j's entries over sequences
    return {
        "mcs-egn": norms,
        "mcs-egs": np.where(norms > 0, -(np.nansum(cos, axis=1) - 1.0) / (e - 1), -np.inf),  # no gradient: -inf
        "mcs-ege": 0.5 * np.log(pooled.var(axis=1, ddof=1)).sum(axis=1),
        "mcs-ego": sum((np.abs(f - f.mean(1, keepdims=True)) > 3 * f.std(1, keepdims=True)).sum(1) for f in flats),
    }


@pytest.mark.parametrize(("form", "stream"), [("accumulated", False), ("accumulated", True), ("per-sequence", False)],
                         ids=["accumulated", "accumulated-stream-layers", "per-sequence"])
def test_criteria_match_the_paper_formulas(form: str, stream: bool, model, data: Path, root: Path) -> None:
    """Each gradient criterion on the collected file against its formula applied directly to the gradients of
    `loss.backward()`: of the whole calibration set's summed loss (accumulated: the paper's), or per sequence."""
    src = model("qwen3_moe")
    out = root / f"signals-{form}-{stream}.safetensors"
    stats = run(src, data, out, gradients=form, stream_layers=stream, samples=3, holdout=0, batch_size=2)
    assert stats.calibration["gradients"] == form and stats.calibration["sampling"] == "packed"
    grads = _gradients(src, main_ids(src, data, 3), form == "accumulated")
    count = stats.get(stats.layers[0], "grad_hidden_count")[0]
    assert count == (1 if form == "accumulated" else 3) * 3 * 32
    for layer in stats.layers:
        direct = paper_signals(grads[layer])
        for name in EGS:
            got = CRITERIA[name].layer_scores(LayerInput(layer, 8, stats=stats.layer(layer)))
            np.testing.assert_allclose(got, direct[name], rtol=1e-5, atol=1e-9, err_msg=f"{name} layer {layer}")


def test_accumulated_differs_from_per_sequence(model, data: Path, root: Path) -> None:
    """The two forms are different signals on the same data (else the option would be pointless)."""
    src = model("qwen3_moe")
    acc = run(src, data, root / "acc.safetensors", gradients="accumulated", samples=3, holdout=0)
    seq = run(src, data, root / "seq.safetensors", gradients="per-sequence", samples=3, holdout=0)
    layer = acc.layers[0]
    a, b = (CRITERIA["mcs-egs"].layer_scores(LayerInput(layer, 8, stats=s.layer(layer))) for s in (acc, seq))
    assert not np.allclose(a, b, rtol=1e-3)


def test_gradient_pass_leaves_the_model_unchanged(model, data: Path) -> None:
    src = model("qwen3_moe")
    m = load_model(src)
    m.get_input_embeddings().weight.requires_grad_(False)  # flags, whatever they are, come back as they were
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()}
    gradient_pass(m, get_spec("qwen3_moe"), [main_ids(src, data, 2)], torch.device("cpu"), progress=False)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None, n


# ---------------------------------------------------------------------------------------------
# 2. torchrun and `stats merge` against one run


def _torchrun(src: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`collect` of 3 sequences on 2 CPU ranks (gloo)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "surgery.cli", "collect", str(src), "-d", str(data), "-o", str(out), "--samples", "3",
           "--holdout", "0", "--seq-len", str(SEQ), "--batch-size", "1", "--seed", str(RUN["seed"]),
           "--device", "cpu", "--dtype", "float32", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_same_as_one_run(model, data: Path, root: Path) -> None:
    src = model("qwen3_moe")
    single = run(src, data, root / "single.safetensors", samples=3, holdout=0, batch_size=3)
    out = root / "torchrun.safetensors"
    proc = _torchrun(src, data, out, "--gradients")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same(StatsFile(out), as_expected(single), SAME_TOL)
    assert single.get(single.layers[0], "grad_hidden_count")[0] == 3 * 3 * 32  # 3 sequences x 3I (holdout excluded)


def test_merge_of_two_shards_same_as_one_run(model, rows: list[str], data: Path, root: Path, cli) -> None:
    src = model("qwen3_moe")
    single = run(src, data, root / "single-merge.safetensors", samples=4, holdout=0)
    parts = []
    for k, share in enumerate((rows[:1], rows[1:])):
        shard = _write_rows(root / f"shard{k}.jsonl", share, RUN["seed"])
        parts.append(root / f"shard{k}.safetensors")
        run(src, shard, parts[-1], samples=len(share), holdout=0, batch_size=1)
    out = root / "merged.safetensors"
    result = cli("stats", "merge", *parts, "-o", out)
    assert result.exit_code == 0, result.output
    assert_same(StatsFile(out), as_expected(single), SAME_TOL)  # single ran batches of 2: sums over sequences


def test_torchrun_accumulated_is_exact(model, data: Path, root: Path) -> None:
    """Two ranks (2 + 1 sequences) all-reduce the summed gradient before its statistics: the same as one run."""
    src = model("qwen3_moe")
    single = run(src, data, root / "acc-single.safetensors", gradients="accumulated", samples=3, holdout=0)
    out = root / "acc-torchrun.safetensors"
    proc = _torchrun(src, data, out, "--gradients", "accumulated")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert StatsFile(out).calibration["gradients"] == "accumulated"
    assert_same(StatsFile(out), as_expected(single), 1e-9)


def test_merge_refuses_accumulated_gradients(model, data: Path, root: Path) -> None:
    acc = run(model("qwen3_moe"), data, root / "acc-merge.safetensors", gradients="accumulated")
    with pytest.raises(StatsError, match="accumulated gradient .* cannot be merged"):
        merge([acc, acc])
    assert merge([acc]).calibration["gradients"] == "accumulated"


@pytest.fixture(scope="module")
def plain(model, data: Path, root: Path) -> StatsFile:
    """A collect without --gradients."""
    out = root / "plain.safetensors"
    collect(model("qwen3_moe"), [str(data)], out, device="cpu", dtype="float32", progress=False, **RUN)
    return StatsFile(out)


def test_merge_with_a_plain_file_drops_the_gradients(plain: StatsFile, collected) -> None:
    assert not set(GRAD) & set(plain.optional_fields)
    stats = collected("qwen3_moe", False)  # the same tokens as `plain`: stand in for other tokens (merge refuses twins)
    other = StatsFile.from_arrays(stats.model, stats.calibration, {
        f"layers.{n}.{f}": a * 2 for n in stats.layers for f, a in stats.layer(n).items()})
    merged = merge([plain, other])
    assert not set(GRAD) & set(merged.optional_fields)
    with pytest.raises(StatsError, match="no tensor"):
        merged.get(merged.layers[0], "grad_gram")


def test_partial_gradient_fields_are_refused(collected) -> None:
    stats = collected("qwen3_moe", False)
    tensors = {f"layers.{n}.{f}": a.copy() for n in stats.layers for f, a in stats.layer(n).items()}
    del tensors[f"layers.{stats.layers[-1]}.grad_outliers"]
    with pytest.raises(StatsError, match="--gradients tensors are incomplete"):
        StatsFile.from_arrays(stats.model, stats.calibration, tensors)


# ---------------------------------------------------------------------------------------------
# 3. The criteria on hand-made statistics


def layer(**fields) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in fields.items()}


def score(name: str, stats: dict) -> np.ndarray:
    return CRITERIA[name].layer_scores(LayerInput(0, len(next(iter(stats.values()))), stats=stats))


def test_registered_with_one_line_formulas(cli) -> None:
    listed = {line.split()[0] for line in cli("criteria").output.splitlines()}
    for name in EGS:
        crit = CRITERIA[name]
        assert name in listed and crit.needs == "stats" and "\n" not in crit.formula and "--gradients" in crit.formula
    assert {n: default_drop(n) for n in EGS} == {"mcs-egs": "high", "mcs-ege": "low", "mcs-ego": "low", "mcs-egn": "low"}


def test_egn() -> None:
    stats = layer(grad_gram=[[4, 1, 0], [1, 9, 0], [0, 0, 0]])
    np.testing.assert_allclose(score("mcs-egn", stats), [2.0, 3.0, 0.0])
    np.testing.assert_allclose(oriented(CRITERIA["mcs-egn"], "high").layer_scores(LayerInput(0, 3, stats=stats)),
                               [-2.0, -3.0, -0.0])


def test_egs_drops_the_most_similar() -> None:
    # experts 0 and 1 have parallel gradients (cosine 1), expert 2 is orthogonal to both, expert 3 has none
    stats = layer(grad_gram=[[1, 2, 0, 0], [2, 4, 0, 0], [0, 0, 9, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(score("mcs-egs", stats), [-1 / 3, -1 / 3, 0.0, -np.inf])
    low = oriented(CRITERIA["mcs-egs"], "low").layer_scores(LayerInput(0, 4, stats=stats))
    np.testing.assert_allclose(low, [1 / 3, 1 / 3, 0.0, -np.inf])


def test_ege() -> None:
    # n = 4 entries per hidden dimension; expert 0 has variances (1, 4), expert 1 constant entries, expert 2 (1, 9)
    stats = layer(grad_hidden_count=[4], grad_hidden_sum=[[0, 0], [4, 4], [2, 0]],
                  grad_hidden_sq_sum=[[3, 12], [4, 4], [4, 27]])
    np.testing.assert_allclose(score("mcs-ege", stats), [np.log(2.0), -np.inf, np.log(3.0)])


def test_ego() -> None:
    np.testing.assert_allclose(score("mcs-ego", layer(grad_outliers=[5, 0, 2])), [5.0, 0.0, 2.0])


@pytest.mark.parametrize("name", EGS)
def test_missing_gradients_say_how_to_get_them(name: str) -> None:
    with pytest.raises(PlanError, match=r"`moe-surgery collect .*--gradients`; re-run it"):
        score(name, layer(count=[1, 2, 3]))


def test_score_cli(plain: StatsFile, model, data: Path, root: Path, cli) -> None:
    """collect --gradients, then score with the paper's best gradient criterion; a plain file gives one error line."""
    src = model("qwen3_moe")
    stats = root / "cli.safetensors"
    result = cli("collect", src, "-d", data, "-o", stats, "--samples", "2", "--holdout", "0", "--seq-len", SEQ,
                 "--device", "cpu", "--dtype", "float32", "--gradients", "--stream-layers")
    assert result.exit_code == 0, result.output
    plan = root / "plan.json"
    result = cli("score", stats, "--criterion", "mcs-ege", "--ratio", "0.25", "-o", plan)
    assert result.exit_code == 0, result.output
    keep = json.loads(plan.read_text())["keep"]
    assert sorted(map(int, keep)) == StatsFile(stats).layers and all(len(ids) == 6 for ids in keep.values())
    result = cli("score", plain.path, "--criterion", "mcs-egn", "--ratio", "0.25", "-o", root / "no.json")
    assert result.exit_code == 2 and not (root / "no.json").exists()
    assert f"{plain.path}: no tensor layers." in result.output and "--gradients" in result.output


def test_docs_list_the_gradient_fields() -> None:
    assert field_table_markdown(GRADIENT_FIELDS) in (REPO / "docs" / "stats-format.md").read_text()
