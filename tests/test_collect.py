"""The collector (`moe-surgery collect`): every statistic against a slow per-token reference, for
every architecture; layer streaming, torchrun and `stats merge` against a plain single run; bad
data and a broken expert formula stop it with a clear error and no file."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import Result
from transformers import AutoTokenizer

from collect_reference import find_moe_blocks, reference_stats
from stats_formats import FIELDS, HOLDOUT_FIELDS, StatsFile
from stats_formats.schema import MCSUITE_FIELDS
from surgery.criteria.mcsuite import eao
from surgery.collect.hooks import SelfCheckError
from surgery.collect.run import collect
from surgery.model.data import build_sequences
from tiny_models import ARCHS, LAYOUTS, build_tiny, load_model
from tiny_tokenizer import save_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
UNSUPPORTED = {"llama4_text"}  # collect refuses these with a clear error
SUPPORTED = [mt for mt in ARCHS if mt not in UNSUPPORTED]

# One small calibration set for every run: 4 + 2 held-out sequences of 24 tokens, batches of 2.
RUN = dict(samples=4, seq_len=24, holdout=2, batch_size=2, seed=3, histogram=True)  # every field, out_hist too
REF_TOL = 1e-6  # collector (float32 experts, float64 sums) vs float64 reference
SAME_TOL = 1e-9  # two ways of running the same float32 computation
FLOOR = 1e-12  # absolute floor of the relative error's denominator (all-zero tensors)

WORDS = ("expert router token layer model prune gate weight sparse dense mixture of the a and "
         "Qwen Mixtral 42 7 3.14 ( ) , ; : ! ? - + = / the quick brown fox jumps over lazy dogs").split()


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("collect")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    """Random-ish text: ~60 documents of words, numbers and punctuation."""
    rng = random.Random(7)
    docs = []
    for _ in range(60):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 25))]
        if rng.random() < 0.3:
            words.append("".join(rng.choice("xyzwq0123456789") for _ in range(rng.randint(3, 9))))
        docs.append(" ".join(words) + rng.choice([".", "\n", "!", ""]))
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def model(root: Path) -> Callable[..., Path]:
    """`model(model_type, layout=None)`: a tiny checkpoint with an offline tokenizer, built once."""
    cache: dict[tuple[str, str], Path] = {}

    def get(model_type: str, layout: str | None = None) -> Path:
        layout = layout or LAYOUTS[model_type][0]
        if (model_type, layout) not in cache:
            path = build_tiny(model_type, root / "models" / f"{model_type}-{layout}", layout=layout)
            vocab = json.loads((path / "config.json").read_text()).get("vocab_size") or 128
            save_tiny_tokenizer(path, vocab_size=min(256, vocab))
            cache[model_type, layout] = path
        return cache[model_type, layout]

    return get


def run_collect(model_dir: Path, data: list[Path], out: Path, **kw) -> StatsFile:
    args = {**RUN, **kw}
    collect(model_dir, [str(p) for p in data], out, device="cpu", dtype="float32", progress=False, **args)
    return StatsFile(out)


@contextlib.contextmanager
def aligned_loading():
    """Inside it, from_pretrained returns freshly allocated parameters (see section 5)."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded = real(*args, **kwargs)
        with torch.no_grad():
            for t in [*loaded.parameters(), *loaded.buffers()]:
                t.data = t.data.clone()
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))
        yield


@pytest.fixture(scope="module")
def stats_of(root: Path) -> Callable[..., StatsFile]:
    """`stats_of(name, model_dir, data, aligned=False, **kw)`: run_collect into root/name once per module, so
    tests that read the same statistics share one run whatever order they run in (or alone)."""
    cache: dict[tuple, StatsFile] = {}

    def get(name: str, model_dir: Path, data: list[Path], aligned: bool = False, **kw) -> StatsFile:
        key = (name, str(model_dir), tuple(map(str, data)), aligned, tuple(sorted(kw.items())))
        if key not in cache:
            assert not (root / name).exists(), f"{name} collected twice with different arguments"
            with aligned_loading() if aligned else contextlib.nullcontext():
                cache[key] = run_collect(model_dir, data, root / name, **kw)
        return cache[key]

    return get


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (with an absolute floor for all-zero tensors)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not actual.size:
        return 0.0
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), FLOOR))


def _fields(holdout: bool) -> list[str]:
    return list(HOLDOUT_FIELDS) if holdout else [f.name for f in FIELDS]


def compare(actual: StatsFile, expected: dict[bool, dict[int, dict[str, np.ndarray]]], tol: float) -> None:
    """Every field of every layer (main and held-out) within `tol`; lists every offender at once."""
    bad = []
    for holdout, layers in expected.items():
        assert actual.layers == sorted(layers), f"layers {actual.layers} != {sorted(layers)}"
        for layer in sorted(layers):
            for name in _fields(holdout):
                err = rel_err(actual.get(layer, name, holdout=holdout), layers[layer][name])
                if not err <= tol:
                    bad.append(f"{'holdout.' if holdout else ''}layer {layer} {name}: rel err {err:.3e}")
    assert not bad, f"{len(bad)} tensors differ by more than {tol:g}:\n" + "\n".join(bad)


def as_expected(stats: StatsFile) -> dict[bool, dict[int, dict[str, np.ndarray]]]:
    return {h: {layer: {n: stats.get(layer, n, holdout=h) for n in _fields(h)} for layer in stats.layers}
            for h in (False, True)}


def same_file(actual: StatsFile, expected: StatsFile, tol: float = SAME_TOL, ignore: tuple[str, ...] = ()) -> None:
    compare(actual, as_expected(expected), tol)
    for key in ("num_tokens", "num_sequences", "holdout_sequences", "seq_len"):
        assert actual.calibration[key] == expected.calibration[key], key
    drop = lambda meta: {k: v for k, v in meta.items() if k not in ignore}  # noqa: E731
    assert drop(actual.model) == drop(expected.model)


def batches_of(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(ids.split(size)) if ids.shape[0] else []


# ---------------------------------------------------------------------------------------------
# 1. Every statistic against the per-token reference


@pytest.mark.parametrize("model_type", ARCHS)
def test_matches_reference(model_type: str, model, data_file: Path, root: Path, stats_of) -> None:
    src = model(model_type)
    if model_type in UNSUPPORTED:
        out = root / f"refused-{model_type}.safetensors"
        with pytest.raises(SelfCheckError, match="does not support"):
            run_collect(src, [data_file], out)
        assert not out.exists()
        return
    stats = stats_of(f"ref-{model_type}.safetensors", src, [data_file])

    # The same sequences, in the same batches, through the plain model.
    tokenizer = AutoTokenizer.from_pretrained(src)
    calib = build_sequences([str(data_file)], tokenizer, RUN["samples"] + RUN["holdout"], RUN["seq_len"], RUN["seed"])
    assert calib.input_ids.shape == (RUN["samples"] + RUN["holdout"], RUN["seq_len"])
    main_ids, held_ids = calib.input_ids[: RUN["samples"]], calib.input_ids[RUN["samples"]:]
    main, held = reference_stats(src, batches_of(main_ids, RUN["batch_size"]), batches_of(held_ids, RUN["batch_size"]))

    moe = sorted(find_moe_blocks(load_model(src)))
    assert moe and sorted(main) == moe == sorted(held)
    assert stats.model["moe_layers"] == moe
    assert stats.calibration["num_tokens"] == RUN["samples"] * RUN["seq_len"]
    assert stats.calibration["holdout_sequences"] == RUN["holdout"]
    for layer in moe:  # the reference saw every token, and routed some of them
        assert main[layer]["tokens"][0] == RUN["samples"] * RUN["seq_len"]
        assert held[layer]["tokens"][0] == RUN["holdout"] * RUN["seq_len"]
        assert main[layer]["count"].sum() > 0
    compare(stats, {False: main, True: held}, REF_TOL)


# ---------------------------------------------------------------------------------------------
# 2. torchrun and `stats merge` give the same file as one run

DIST_SEQ = 24
DIST_RUN = dict(samples=4, holdout=2, seq_len=DIST_SEQ, batch_size=1, seed=5, histogram=True)


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGH ") for _ in range(n))


def _write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _order_for(desired: list[str], seed: int) -> list[str]:
    """A file order that build_sequences' seeded shuffle turns into `desired` (the permutation
    depends only on the number of documents and the seed)."""
    perm = list(range(len(desired)))
    random.Random(seed).shuffle(perm)
    docs = [""] * len(desired)
    for j, i in enumerate(perm):
        docs[i] = desired[j]
    return docs


@pytest.fixture(scope="module")
def dist_setup(model, root: Path) -> dict:
    """A data file whose packed sequences are exactly `document + EOS` (documents of seq_len - 1
    characters, one token each), so each rank's share can be written as a data file of its own."""
    src = model("qwen3_moe")
    tokenizer = AutoTokenizer.from_pretrained(src)
    rng = random.Random(11)
    n_rows = DIST_RUN["samples"] + DIST_RUN["holdout"]
    docs = [_letters(rng, DIST_SEQ - 1) for _ in range(n_rows + 1)]  # the last shuffled one is cut off
    data = _write_docs(root / "dist.jsonl", docs)
    calib = build_sequences([str(data)], tokenizer, n_rows, DIST_SEQ, DIST_RUN["seed"])
    shuffled = docs[:]
    random.Random(DIST_RUN["seed"]).shuffle(shuffled)
    for row, doc in zip(calib.input_ids.tolist(), shuffled):  # the premise of the share files
        assert row == tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    single = run_collect(src, [data], root / "dist-single.safetensors", **DIST_RUN)
    return {"src": src, "data": data, "rows": shuffled[:n_rows], "single": single}


@pytest.fixture(scope="module")
def torchrun_file(dist_setup: dict, root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The dist_setup collect run by torchrun on two CPU ranks: (its statistics file, the process)."""
    out = root / "dist-torchrun.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "surgery.cli", "collect", str(dist_setup["src"]), "-d", str(dist_setup["data"]), "-o", str(out),
           "--samples", str(DIST_RUN["samples"]), "--holdout", str(DIST_RUN["holdout"]),
           "--seq-len", str(DIST_SEQ), "--batch-size", "1", "--seed", str(DIST_RUN["seed"]),
           "--device", "cpu", "--dtype", "float32", "--histogram"]
    return out, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_same_as_one_run(torchrun_file: tuple[Path, subprocess.CompletedProcess],
                                            dist_setup: dict) -> None:
    out, proc = torchrun_file
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Wrote ") == 1, proc.stdout  # rank 0 alone reports and writes
    same_file(StatsFile(out), dist_setup["single"])


@pytest.fixture(scope="module")
def merged_file(dist_setup: dict, root: Path, cli) -> tuple[Path, Result]:
    """Rank r of 2 takes main rows r::2 and held-out rows r::2: each share collected on its own (same
    sequences, same batches of one), then `stats merge`: (the merged file, the merge command's result)."""
    rows, n_main = dist_setup["rows"], DIST_RUN["samples"]
    filler = "filler text that is never a full sequence"[: DIST_SEQ - 2]
    parts = []
    for rank in range(2):
        main, held = rows[:n_main][rank::2], rows[n_main:][rank::2]
        data = _write_docs(root / f"share{rank}.jsonl", _order_for(main + held + [filler], DIST_RUN["seed"]))
        out = root / f"share{rank}.safetensors"
        run_collect(dist_setup["src"], [data], out, **{**DIST_RUN, "samples": len(main), "holdout": len(held)})
        parts.append(out)
    merged = root / "dist-merged.safetensors"
    return merged, cli("stats", "merge", *parts, "-o", merged)


def test_merge_of_rank_shares_same_as_one_run(merged_file: tuple[Path, Result], dist_setup: dict) -> None:
    """`stats merge` of the two ranks' shares, each collected on its own, gives the single-run file."""
    merged, result = merged_file
    assert result.exit_code == 0, result.output
    single = dist_setup["single"]
    compare(StatsFile(merged), as_expected(single), SAME_TOL)
    assert StatsFile(merged).calibration["num_tokens"] == single.calibration["num_tokens"]
    assert StatsFile(merged).calibration["holdout_sequences"] == single.calibration["holdout_sequences"]


# ---------------------------------------------------------------------------------------------
# 3. Bad data: exit 2, one line naming the file, no statistics file

BAD_DATA = {
    "corrupt.jsonl": (b'{"text": "fine"}\n{"text": broken\n', "not valid JSON"),
    "empty.jsonl": (b"", "empty file"),
    "latin1.txt": ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"), "not UTF-8"),
    "short.jsonl": (b'{"text": "too short"}\n', "not enough for one sequence"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_exits_2(name: str, model, root: Path, tmp_path: Path, cli) -> None:
    content, why = BAD_DATA[name]
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "stats.safetensors"
    result = cli("collect", model("qwen3_moe"), "-d", data, "-o", out, "--samples", "2", "--seq-len", "32",
                 "--holdout", "0", "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(data) in lines[0] and why in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob("*.safetensors*"))  # no temporary file left either


# ---------------------------------------------------------------------------------------------
# 4. Self-check: a wrong expert formula is caught before anything is written


def _wrong_expert_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.collect.hooks as hooks

    real = hooks.grouped_forward

    def wrong(experts, kind, x, expert, counts):
        h, f = real(experts, kind, x, expert, counts)
        return h, f * 1.5

    monkeypatch.setattr(hooks, "grouped_forward", wrong)


@pytest.mark.parametrize("stream_layers", [False, True], ids=["plain", "stream"])
def test_self_check_catches_wrong_expert_math(stream_layers: bool, model, data_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _wrong_expert_forward(monkeypatch)
    out = tmp_path / "stats.safetensors"
    with pytest.raises(SelfCheckError, match="self-check"):
        run_collect(model("qwen3_moe"), [data_file], out, stream_layers=stream_layers)
    assert not out.exists()
    assert not list(tmp_path.glob("*.safetensors*"))


def test_self_check_failure_through_cli(model, data_file: Path, tmp_path: Path, cli,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _wrong_expert_forward(monkeypatch)
    out = tmp_path / "stats.safetensors"
    result = cli("collect", model("qwen3_moe"), "-d", data_file, "-o", out, "--samples", "2", "--seq-len", "16",
                 "--holdout", "0", "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 2, (result.output, result.exception)
    # The progress bar is on when the check fails, so the message may follow it on the same line.
    errors = [line[line.index("Error:"):] for line in result.stderr.splitlines() if "Error:" in line]
    assert len(errors) == 1 and "self-check" in errors[0], result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. The other on-disk layout and --stream-layers give the same file
#
# from_pretrained leaves parameters as views into the memory-mapped shards, at offsets that are
# not 64-byte aligned; CPU float32 kernels then round differently from the same computation on
# the freshly allocated parameters of a streamed layer (~1e-8 relative). `aligned` makes the
# plain run use fresh copies (aligned_loading), so the two runs compute the very same float32 numbers.


TWO_LAYOUTS = [mt for mt in SUPPORTED if len(LAYOUTS[mt]) > 1]


@pytest.mark.parametrize("model_type", TWO_LAYOUTS)
def test_fused_layout_same_file_as_per_expert(model_type: str, model, data_file: Path, root: Path) -> None:
    with aligned_loading():
        files = [run_collect(model(model_type, layout), [data_file], root / f"layout-{model_type}-{layout}.safetensors")
                 for layout in ("per-expert", "fused")]
    # The router hash covers on-disk tensor names, which may differ between layouts (ernie4_5_moe).
    same_file(files[1], files[0], SAME_TOL, ignore=("router_sha256",))


STREAM_CASES = [
    ("qwen3_moe", "per-expert"),
    ("qwen3_moe", "fused"),
    ("qwen3_next", "per-expert"),  # linear-attention layers and a dense layer
    ("mixtral", "fused"),
    ("mixtral", "per-expert"),  # on disk block_sparse_moe.experts.{i}.w1/w2/w3, in memory mlp.experts.gate_up_proj
    ("phimoe", "per-expert"),  # on disk block_sparse_moe.gate, in memory mlp.router
    ("granitemoe", "fused"),  # on disk router.layer.weight, in memory router.weight
    ("gpt_oss", "fused"),  # interleaved gate/up with biases
    ("deepseek_v3", "per-expert"),  # e_score_correction_bias buffer in the router
    ("ernie4_5_moe", "per-expert"),  # on disk mlp.moe_statics, in memory mlp.gate.moe_statics
]


@pytest.mark.parametrize("model_type,layout", STREAM_CASES, ids=[f"{m}-{lay}" for m, lay in STREAM_CASES])
def test_stream_layers_same_file(model_type: str, layout: str, model, data_file: Path, stats_of) -> None:
    src = model(model_type, layout)
    name = f"{model_type}-{layout}"
    plain = stats_of(f"plain-{name}.safetensors", src, [data_file])
    streamed = stats_of(f"stream-{name}.safetensors", src, [data_file], stream_layers=True)
    same_file(streamed, plain, REF_TOL)
    plain_aligned = stats_of(f"plain-aligned-{name}.safetensors", src, [data_file], aligned=True)
    same_file(streamed, plain_aligned, SAME_TOL)


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_stream_hidden_states_placement(where: str, model, data_file: Path, root: Path, tmp_path: Path) -> None:
    """Hidden states kept in RAM or in a memory-mapped file give the same statistics, and no spill file remains."""
    src = model("qwen3_moe", "per-expert")
    out = tmp_path / "stats.safetensors"
    got = run_collect(src, [data_file], out, stream_layers=True, hidden_states=where)
    ref = run_collect(src, [data_file], root / f"stream-ref-{where}.safetensors", stream_layers=True, hidden_states="cpu")
    same_file(got, ref, SAME_TOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_multimodal_wrapper_is_refused(tmp_path: Path, data_file: Path) -> None:
    """Nested (multimodal) configs are rewriter-only: collect says so in one line and writes nothing."""
    import json as _json

    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from surgery.cli import main

    src = tmp_path / "vl"
    src.mkdir()
    (src / "config.json").write_text(_json.dumps({"model_type": "qwen3_vl_moe", "text_config": {
        "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1}}))
    save_file({"model.language_model.layers.0.mlp.gate.weight": np.zeros((4, 8), np.float32)},
              str(src / "model.safetensors"))
    out = tmp_path / "stats.safetensors"
    result = CliRunner().invoke(main, ["collect", str(src), "-d", str(data_file), "-o", str(out)])
    assert result.exit_code == 2
    assert "text-only" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_tokenizer_is_refused(model, data_file: Path, tmp_path: Path) -> None:
    """Without tokenizer files transformers builds an empty tokenizer; collect must say so, not tokenize to nothing."""
    from click.testing import CliRunner

    from surgery.cli import main

    src = tmp_path / "no-tokenizer"
    shutil.copytree(model("qwen3_moe", "per-expert"), src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (src / f).unlink(missing_ok=True)
    out = tmp_path / "stats.safetensors"
    result = CliRunner().invoke(main, ["collect", str(src), "-d", str(data_file), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "no usable tokenizer" in result.output and not out.exists()


# ---------------------------------------------------------------------------------------------
# 6. The MC-Suite fields (optional in the schema, written by every collect; the sections above
#    compare the FIELDS only): against the reference, across ranks and merges, and streamed.
#    The statistics files come from the module's fixtures, shared with the tests above.

MCSUITE = [f.name for f in MCSUITE_FIELDS]
# out_hist bins values on a log grid, so a value near zero, whose float32 rounding is large relative to
# it, moves its weight between neighbouring bins by up to ~1e-2 of a unit. Against the float64
# reference, each row's cumulative sum (where such moves stay local) is compared to HIST_TOL of the
# row's total (one misplaced value is ~2e-4 of it); far from zero, where outliers are, the bins are as
# exact as the sums (the EAO score from them is checked at REF_TOL), and the binning itself is checked
# on float64 values at SAME_TOL.
HIST_TOL = 1e-4


def mcsuite_of(stats: StatsFile) -> dict[int, dict[str, np.ndarray]]:
    return {layer: {name: stats.get(layer, name) for name in MCSUITE} for layer in stats.layers}


def compare_mcsuite(actual: StatsFile, expected: dict[int, dict[str, np.ndarray]], tol: float,
                    hist_tol: float | None = None) -> None:
    """Every MC-Suite field within `tol`; with `hist_tol`, out_hist's cumulative rows within that instead."""
    assert actual.layers == sorted(expected), f"layers {actual.layers} != {sorted(expected)}"
    bad = []
    for layer in sorted(expected):
        for name in MCSUITE:
            ours, theirs, limit = actual.get(layer, name), expected[layer][name], tol
            if name == "out_hist" and hist_tol:
                ours, theirs, limit = np.cumsum(ours, axis=1), np.cumsum(theirs, axis=1), hist_tol
            if not (err := rel_err(ours, theirs)) <= limit:
                bad.append(f"layer {layer} {name}: rel err {err:.3e}")
    assert not bad, f"{len(bad)} tensors differ by more than {tol:g}:\n" + "\n".join(bad)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_mcsuite_fields_match_reference(model_type: str, model, data_file: Path, stats_of) -> None:
    src = model(model_type)
    stats = stats_of(f"ref-{model_type}.safetensors", src, [data_file])
    tokenizer = AutoTokenizer.from_pretrained(src)
    calib = build_sequences([str(data_file)], tokenizer, RUN["samples"] + RUN["holdout"], RUN["seq_len"], RUN["seed"])
    main, _ = reference_stats(src, batches_of(calib.input_ids[: RUN["samples"]], RUN["batch_size"]), [])
    compare_mcsuite(stats, main, REF_TOL, HIST_TOL)
    for layer in stats.layers:  # never-routed experts score -inf in both
        ours, theirs = eao(stats.layer(layer)), eao(main[layer])
        routed = np.isfinite(theirs)
        assert np.array_equal(routed, np.isfinite(ours)) and rel_err(ours[routed], theirs[routed]) <= REF_TOL, layer
    hidden = stats.model["hidden_size"]
    assert stats.model["vocab_size"] == json.loads((src / "config.json").read_text())["vocab_size"]
    for layer in stats.layers:  # each routed output value's unit weight lands once; some token ids were seen
        np.testing.assert_allclose(stats.get(layer, "out_hist").sum(axis=1), stats.get(layer, "count") * hidden)
        assert stats.get(layer, "token_bits").any()


def test_histogram_only_with_the_option(model, data_file: Path, stats_of) -> None:
    """out_hist is opt-in (`--histogram`); the other statistics are the same with or without it."""
    src = model("qwen3_moe")
    plain = stats_of("no-hist.safetensors", src, [data_file], histogram=False)
    full = stats_of("ref-qwen3_moe.safetensors", src, [data_file])
    assert plain.optional_fields == ("token_bits",) and full.optional_fields == ("out_hist", "token_bits")
    compare(plain, as_expected(full), SAME_TOL)
    assert np.array_equal(plain.get(plain.layers[0], "token_bits"), full.get(full.layers[0], "token_bits"))


def test_histogram_binning_matches_reference() -> None:
    """The collector's out_hist of float64 values (no rounding to amplify) equals the reference's."""
    from collect_reference import _histogram_add

    from surgery.collect.accumulator import LayerAccumulator

    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-6, 5, 12, base=2.0, dtype=torch.float64)  # 2^-6 .. 2^5, one per row
    f = torch.randn(200, 12, generator=gen, dtype=torch.float64) * scale[torch.randint(0, 12, (200, 1), generator=gen)]
    f[0, :3] = torch.tensor([0.0, 2.0**-20, -(2.0**20)])  # below and above the grid
    expert = torch.sort(torch.randint(0, 3, (200,), generator=gen)).values
    acc = LayerAccumulator(3, 12, 4, "cpu", fields=["out_hist"])
    acc._add_histogram(f, expert)
    expected = np.zeros((3, 513))
    for row, e in zip(f.numpy(), expert.tolist()):
        _histogram_add(expected[e], row)
    assert rel_err(acc.sums["out_hist"].numpy(), expected) <= SAME_TOL
    np.testing.assert_allclose(acc.sums["out_hist"].sum(1).numpy(), 12 * np.bincount(expert.numpy(), minlength=3))


def test_mcsuite_fields_same_across_ranks_and_merges(dist_setup: dict,
                                                     torchrun_file: tuple[Path, subprocess.CompletedProcess],
                                                     merged_file: tuple[Path, Result]) -> None:
    (ranks, proc), (merged, result) = torchrun_file, merged_file
    assert proc.returncode == 0 and result.exit_code == 0, "the torchrun or merge test says why"
    single = mcsuite_of(dist_setup["single"])
    compare_mcsuite(StatsFile(ranks), single, SAME_TOL)
    compare_mcsuite(StatsFile(merged), single, SAME_TOL)


@pytest.mark.parametrize("model_type,layout", [("qwen3_moe", "per-expert"), ("qwen3_next", "per-expert"),
                                               ("gpt_oss", "fused")])
def test_mcsuite_fields_same_with_stream_layers(model_type: str, layout: str, model, data_file: Path,
                                                stats_of) -> None:
    src, name = model(model_type, layout), f"{model_type}-{layout}"
    streamed = stats_of(f"stream-{name}.safetensors", src, [data_file], stream_layers=True)
    plain = stats_of(f"plain-aligned-{name}.safetensors", src, [data_file], aligned=True)
    compare_mcsuite(streamed, mcsuite_of(plain), SAME_TOL)


# ---------------------------------------------------------------------------------------------
# 7. GPU-minded pieces, checked on the CPU: the token-id bit set (no host sync), the vocabulary check,
#    and the Triton segment sums (through Triton's interpreter where Triton is installed).

def test_mark_tokens_sets_exactly_the_seen_pairs() -> None:
    from surgery.collect.accumulator import _mark_tokens, unpack_bits

    gen = torch.Generator().manual_seed(0)
    num_experts, vocab = 5, 61  # a vocabulary that does not fill its last byte
    expert = torch.randint(0, num_experts, (400,), generator=gen)
    ids = torch.randint(0, vocab, (400,), generator=gen)  # many repeated (expert, id) pairs
    bits = torch.zeros(num_experts, -(-vocab // 8), dtype=torch.uint8)
    bits[0, 0] = 0b100  # bits already set stay set
    _mark_tokens(bits, expert, ids)
    expected = torch.zeros(num_experts, bits.shape[1] * 8, dtype=torch.uint8)
    expected[expert, ids] = 1
    expected[0, 2] = 1
    assert torch.equal(unpack_bits(bits), expected)
    _mark_tokens(bits, expert[:0], ids[:0])  # an empty batch changes nothing
    assert torch.equal(unpack_bits(bits), expected)


def test_token_id_outside_the_vocabulary_is_refused(model) -> None:
    from surgery.architectures import get_spec
    from surgery.collect.hooks import Instrument

    src = model("qwen3_moe")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    inst = Instrument(load_model(src), get_spec("qwen3_moe"), "cpu", 1e-4, vocab_size=vocab)
    inst.set_tokens(torch.tensor([[0, vocab - 1]]))
    with pytest.raises(SelfCheckError, match=f"token id {vocab} is outside the vocabulary"):
        inst.set_tokens(torch.tensor([[1, vocab]]))


SEGMENT_CHECK = """
import torch
from surgery.collect import segment_sums as ss
torch.manual_seed(0)
worst = 0.0
for e, d, n in [(5, 200, 3000), (3, 130, 50), (8, 64, 20000)]:  # one share and several per expert
    expert = torch.sort(torch.randint(0, e, (n,))).values
    expert[expert == 1] = 2  # an expert with no rows
    counts = torch.zeros(e, dtype=torch.long).scatter_add_(0, expert, torch.ones_like(expert))
    v, a, b = torch.randn(n, d).bfloat16(), torch.rand(n), torch.rand(n)
    out = ss.segment_sums(v, counts, a=a, b=b, with_sum=True)
    vf, oh = v.double(), torch.nn.functional.one_hot(expert, e).T.double()
    ref = {"sum": oh @ vf, "sq": oh @ vf**2, "a": oh @ (vf * a.double()[:, None]), "b": oh @ (vf**2 * b.double()[:, None])}
    for k, r in ref.items():
        worst = max(worst, ((out[k].double() - r).abs().max() / r.abs().max()).item())
print(worst)
"""


def test_triton_segment_sums_match_one_hot_sums() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SEGMENT_CHECK], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-6


def test_tokenizer_of_another_model_exits_2(model, data_file: Path, tmp_path: Path, cli) -> None:
    """Token ids beyond config.json's vocab_size are refused before the model runs, naming the config."""
    src = tmp_path / "small-vocab"
    shutil.copytree(model("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = 8  # the tiny tokenizer's ids go well past 8
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "stats.safetensors"
    result = cli("collect", src, "-d", data_file, "-o", out, "--samples", "2", "--seq-len", "32", "--holdout", "0",
                 "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(src / "config.json") in lines[0] and "vocab_size is 8" in lines[0], lines
    assert not out.exists()


def test_sampling_is_recorded(model, data_file: Path, tmp_path: Path, cli) -> None:
    """Each file records its --sampling (the windows themselves: tests/test_data_eval.py), a merge of both says
    mixed; documents shorter than every window give one error line and no file."""
    from stats_formats import merge

    files = {}
    for sampling in ("packed", "documents"):
        out = files[sampling] = tmp_path / f"{sampling}.safetensors"
        result = cli("collect", model("qwen3_moe"), "-d", data_file, "-o", out, "--samples", "4", "--seq-len", "8",
                     "--holdout", "0", "--device", "cpu", "--dtype", "float32", "--sampling", sampling)
        assert result.exit_code == 0, result.output
        assert StatsFile(out).calibration["sampling"] == sampling
        assert "gradients" not in StatsFile(out).calibration
    assert merge([StatsFile(files["packed"]), StatsFile(files["documents"])]).calibration["sampling"] == "mixed"
    result = cli("collect", model("qwen3_moe"), "-d", data_file, "-o", tmp_path / "no.safetensors", "--samples", "4",
                 "--seq-len", "4000", "--holdout", "0", "--device", "cpu", "--sampling", "documents")
    assert result.exit_code == 2 and "no document has 256 tokens" in result.output  # seq_len capped at 256
    assert not (tmp_path / "no.safetensors").exists()
