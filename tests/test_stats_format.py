"""The statistics file: round trip, exact merges, validation of malformed files, exports and CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from stats_factory import compute_fields, default_calibration, default_model, fake_layers, layer_fields, make_stats

import surgery
from stats_formats import (
    FIELD_BY_NAME,
    FIELDS,
    HOLDOUT_FIELDS,
    METADATA_KEY,
    SUMMARY_COLUMNS,
    StatsError,
    StatsFile,
    StatsWriter,
    merge,
    summary_table,
    tensor_name,
    to_csv,
    to_json,
)
from stats_formats.schema import field_table_markdown
from surgery.cli import main

Model = dict[str, Any]
Tensors = dict[str, np.ndarray]
Edit = Callable[[Tensors, dict[str, Any]], None]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "stats-format.md"


def _metadata(model: Model, calibration: dict[str, Any], version: str = "1.0") -> dict[str, str]:
    meta = {
        "schema": "moe-surgery-stats",
        "version": version,
        "model": model,
        "calibration": calibration,
        "tool_version": "test",
        "created": "2025-01-01T00:00:00+00:00",
    }
    return {METADATA_KEY: json.dumps(meta)}


def _write_raw(path: Path, tensors: Tensors, metadata: dict[str, str] | None) -> Path:
    """Bypass the project writer so malformed files can be produced."""
    save_file(tensors, str(path), metadata=metadata)
    return path


def _write(path: Path, model: Model, tensors: Tensors, **calibration: Any) -> Path:
    StatsFile.from_arrays(model, default_calibration(**calibration), tensors).save(path)
    return path


def _assert_one_line_error(excinfo: pytest.ExceptionInfo[StatsError], path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(actual - expected).max()) <= 1e-12 * scale


@pytest.fixture
def model() -> Model:
    return default_model()


@pytest.fixture
def tensors(model: Model) -> Tensors:
    return make_stats(model, tokens_per_layer=32, seed=0, holdout_tokens=8)


# ---------------------------------------------------------------------------------------------
# Writing and reading


def test_writer_round_trip_is_exact(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    calibration = default_calibration(num_tokens=32, holdout_sequences=1)
    writer = StatsWriter(model, calibration)
    for layer in model["moe_layers"]:
        for field in FIELDS:
            writer.add(layer, field.name, tensors[tensor_name(layer, field.name)])
        for name in HOLDOUT_FIELDS:
            writer.add(layer, name, tensors[tensor_name(layer, name, True)], holdout=True)
    path = tmp_path / "stats.safetensors"
    written = writer.save(path)

    sf = StatsFile(path)
    assert sf.path == path
    assert sf.model == model
    assert sf.calibration == calibration
    assert sf.layers == [0, 1]
    assert sf.num_experts == 4
    assert sf.has_holdout
    assert sf.metadata["tool_version"] == surgery.__version__
    assert datetime.fromisoformat(sf.metadata["created"]).tzinfo is not None
    for layer in sf.layers:
        for field, values in sf.layer(layer).items():
            assert values.dtype == np.float64
            np.testing.assert_array_equal(values, tensors[tensor_name(layer, field)])
        for field, values in sf.layer(layer, holdout=True).items():
            np.testing.assert_array_equal(values, tensors[tensor_name(layer, field, True)])
    assert sf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written.sha256 == sf.sha256
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_file_reads_without_the_project(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    """Plain safetensors + json are enough to read a statistics file."""
    from safetensors import safe_open

    path = _write(tmp_path / "s.safetensors", model, tensors, num_tokens=32)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, values in tensors.items():
        np.testing.assert_array_equal(loaded[name], values)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["moe_surgery"])
    assert meta["schema"] == "moe-surgery-stats"
    assert meta["version"] == "1.0"
    assert meta["model"] == model
    assert meta["calibration"]["num_tokens"] == 32


def test_newer_minor_version_is_read_ignoring_unknown_parts(
    tmp_path: Path, model: Model, tensors: Tensors
) -> None:
    extra = dict(tensors, **{"layers.0.future_field": np.full(3, -1.0)})
    meta = json.loads(_metadata(dict(model, future_key=1), default_calibration(), version="1.7")[METADATA_KEY])
    meta["future_section"] = {"x": 1}
    path = _write_raw(tmp_path / "s.safetensors", extra, {METADATA_KEY: json.dumps(meta)})
    sf = StatsFile(path)
    assert sf.version == "1.7"
    np.testing.assert_array_equal(sf.get(0, "count"), tensors["layers.0.count"])
    copy = tmp_path / "copy.safetensors"
    sf.save(copy)
    assert set(load_file(str(copy))) == set(extra)


def test_in_memory_sha256_matches_saved_file(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    sf = StatsFile.from_arrays(model, default_calibration(), tensors)
    path = tmp_path / "s.safetensors"
    sf.save(path)
    assert sf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_arrays_handed_out_are_read_only(model: Model, tensors: Tensors) -> None:
    sf = StatsFile.from_arrays(model, default_calibration(), tensors)
    with pytest.raises(ValueError):
        sf.get(0, "count")[0] = 1.0


def test_get_unknown_layer_or_missing_holdout(model: Model) -> None:
    sf = StatsFile.from_arrays(model, default_calibration(), make_stats(model, 8, seed=1))
    with pytest.raises(StatsError, match="no statistics for layer 7"):
        sf.get(7, "count")
    with pytest.raises(StatsError, match="no holdout statistics"):
        sf.get(0, "count", holdout=True)


def test_writer_rejects_wrong_shape_unknown_field_and_bad_layer(model: Model) -> None:
    writer = StatsWriter(model, default_calibration())
    with pytest.raises(StatsError, match=r"tensor layers\.1\.count has shape \[3\], expected \[4\]"):
        writer.add(1, "count", np.zeros(3))
    with pytest.raises(StatsError, match="unknown field"):
        writer.add(0, "counts", np.zeros(4))
    with pytest.raises(StatsError, match="no holdout slice"):
        writer.add(0, "out_sum", np.zeros((4, 6)), holdout=True)
    with pytest.raises(StatsError, match="not an MoE layer"):
        writer.add(5, "count", np.zeros(4))
    writer.add(0, "count", np.zeros(4))
    with pytest.raises(StatsError, match="added twice"):
        writer.add(0, "count", np.zeros(4))


def test_incomplete_writer_leaves_no_file(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    writer = StatsWriter(model, default_calibration())
    for field in FIELDS:
        writer.add(0, field.name, tensors[tensor_name(0, field.name)])
    path = tmp_path / "s.safetensors"
    with pytest.raises(StatsError) as excinfo:
        writer.save(path)
    _assert_one_line_error(excinfo, path, "layers.1.tokens", "missing")
    assert list(tmp_path.iterdir()) == []


def test_writer_requires_holdout_for_every_layer(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    writer = StatsWriter(model, default_calibration())
    for layer in model["moe_layers"]:
        for field in FIELDS:
            writer.add(layer, field.name, tensors[tensor_name(layer, field.name)])
    writer.add(0, "count", tensors["holdout.layers.0.count"], holdout=True)
    with pytest.raises(StatsError, match="holdout tensors are incomplete"):
        writer.save(tmp_path / "s.safetensors")


# ---------------------------------------------------------------------------------------------
# Malformed files


def _drop(name: str) -> Edit:
    return lambda t, m: t.pop(name)


def _set(name: str, index: tuple[int, ...], value: float) -> Edit:
    def edit(t: Tensors, m: dict[str, Any]) -> None:
        t[name] = t[name].copy()
        t[name][index] = value

    return edit


def _meta(key: str, value: Any) -> Edit:
    return lambda t, m: m.__setitem__(key, value)


MALFORMED = {
    "major version 2": (_meta("version", "2.0"), ("version 2.0", "1.x")),
    "bad version": (_meta("version", "one"), ("MAJOR.MINOR",)),
    "other schema": (_meta("schema", "something-else"), ("schema",)),
    "missing model key": (lambda t, m: m["model"].pop("top_k"), ("model.top_k", "missing")),
    "bool as int": (lambda t, m: m["model"].__setitem__("num_experts", True), ("model.num_experts",)),
    "missing calibration": (lambda t, m: m.pop("calibration"), ("calibration",)),
    "missing tensor": (_drop("layers.1.gram"), ("layers.1.gram", "missing")),
    "wrong shape": (lambda t, m: t.__setitem__("layers.0.count", np.zeros(5)), ("layers.0.count", "[5]", "[4]")),
    "wrong dtype": (lambda t, m: t.__setitem__("layers.0.count", np.zeros(4, np.float32)), ("F32", "F64")),
    "nan": (_set("layers.1.out_sum", (2, 3), np.nan), ("layers.1.out_sum", "NaN", "[2, 3]")),
    "inf": (_set("layers.0.gram", (0, 1), np.inf), ("layers.0.gram", "Inf")),
    "negative count": (_set("layers.0.count", (1,), -1.0), ("layers.0.count", "negative")),
    "negative coselect": (_set("layers.1.coselect", (0, 1), -2.0), ("layers.1.coselect", "negative")),
    "partial holdout": (_drop("holdout.layers.1.gram"), ("holdout", "holdout.layers.1.gram")),
    "nan in holdout": (_set("holdout.layers.0.moment_g", (0, 0, 0), np.nan), ("holdout.layers.0.moment_g", "NaN")),
}


def _assert_edit_rejected(tmp_path: Path, model: Model, tensors: Tensors, edit: Edit, words: tuple[str, ...]) -> None:
    """Write the file `edit` spoils (tensors and metadata); reading it fails with one line holding `words`."""
    meta = json.loads(_metadata(model, default_calibration())[METADATA_KEY])
    edit(tensors, meta)
    path = _write_raw(tmp_path / "bad.safetensors", tensors, {METADATA_KEY: json.dumps(meta)})
    with pytest.raises(StatsError) as excinfo:
        StatsFile(path)
    _assert_one_line_error(excinfo, path, *words)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_rejected(
    case: str, tmp_path: Path, model: Model, tensors: Tensors
) -> None:
    _assert_edit_rejected(tmp_path, model, dict(tensors), *MALFORMED[case])


def test_gram_and_signed_sums_may_be_negative(model: Model, tensors: Tensors) -> None:
    assert (tensors["layers.0.out_sum"] < 0).any()
    StatsFile.from_arrays(model, default_calibration(), tensors)


@pytest.mark.parametrize(
    "case,words",
    [
        ("text", ("not a valid safetensors file",)),
        ("truncated", ("not a valid safetensors file",)),
        ("empty", ("not a valid safetensors file",)),
        ("no metadata", ("moe_surgery",)),
        ("not json", ("not valid JSON",)),
        ("missing", ("no such file",)),
        ("directory", ("directory",)),
    ],
)
def test_unreadable_file_is_rejected(
    case: str, words: tuple[str, ...], tmp_path: Path, model: Model, tensors: Tensors
) -> None:
    path = tmp_path / "bad.safetensors"
    good = _write(tmp_path / "good.safetensors", model, tensors).read_bytes()
    if case == "text":
        path.write_text("this is not a statistics file\n" * 3)
    elif case == "truncated":
        path.write_bytes(good[:-100])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no metadata":
        _write_raw(path, tensors, None)
    elif case == "not json":
        _write_raw(path, tensors, {METADATA_KEY: "{not json"})
    elif case == "directory":
        path.mkdir()
    with pytest.raises(StatsError) as excinfo:
        StatsFile(path)
    _assert_one_line_error(excinfo, path, *words)


# ---------------------------------------------------------------------------------------------
# Merging


def test_merge_of_disjoint_token_sets_equals_union(tmp_path: Path, model: Model) -> None:
    tokens = fake_layers(model, 40, seed=3)
    holdout = fake_layers(model, 12, seed=4)
    a = _write(
        tmp_path / "a.safetensors", model,
        compute_fields({l: t[:15] for l, t in tokens.items()}, {l: t[:5] for l, t in holdout.items()}),
    )
    b = _write(
        tmp_path / "b.safetensors", model,
        compute_fields({l: t[15:] for l, t in tokens.items()}, {l: t[5:] for l, t in holdout.items()}),
    )
    merged = merge([a, StatsFile(b)])
    expected = compute_fields(tokens, holdout)
    assert merged.has_holdout
    for layer in model["moe_layers"]:
        for field in FIELDS:
            _assert_close(merged.get(layer, field.name), expected[tensor_name(layer, field.name)])
        for name in HOLDOUT_FIELDS:
            _assert_close(merged.get(layer, name, True), expected[tensor_name(layer, name, True)])
    # a maximum, not a sum: the union's value is one of the parts'
    assert FIELD_BY_NAME["out_norm_max"].merge == "max"
    np.testing.assert_array_equal(
        merged.get(0, "out_norm_max"),
        np.maximum(StatsFile(a).get(0, "out_norm_max"), StatsFile(b).get(0, "out_norm_max")),
    )
    out = tmp_path / "merged.safetensors"
    merged.save(out)
    np.testing.assert_array_equal(StatsFile(out).get(1, "gram"), merged.get(1, "gram"))


def test_merge_calibration_and_holdout_rules(tmp_path: Path, model: Model) -> None:
    a = StatsFile.from_arrays(
        model,
        default_calibration(num_tokens=10, num_sequences=2, seq_len=5, seed=1, sources=["x"], holdout_sequences=1),
        make_stats(model, 10, seed=0, holdout_tokens=4),
    )
    b = StatsFile.from_arrays(
        model,
        default_calibration(num_tokens=20, num_sequences=2, seq_len=10, seed=2, sources=["x", "y"]),
        make_stats(model, 20, seed=1),
    )
    merged = merge([a, b])
    assert merged.calibration == {
        "sources": ["x", "x", "y"],
        "num_sequences": 4,
        "num_tokens": 30,
        "seq_len": 10,
        "seed": None,
        "holdout_sequences": 1,
        "sampling": "packed",  # files from before the key were packed
    }
    assert not merged.has_holdout
    other = StatsFile.from_arrays(model, a.calibration, make_stats(model, 10, seed=5, holdout_tokens=4))
    same = merge([a, other])
    assert same.calibration["seed"] == 1 and same.calibration["seq_len"] == 5
    assert same.has_holdout
    np.testing.assert_array_equal(same.get(0, "count", True), a.get(0, "count", True) + other.get(0, "count", True))


def test_merge_refuses_the_same_statistics_twice(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    """A file given twice, or a copy of it: its tokens would count twice."""
    a = _write(tmp_path / "a.safetensors", model, tensors)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    with pytest.raises(StatsError) as excinfo:
        merge([a, copy])
    _assert_one_line_error(excinfo, copy, "same statistics", str(a))
    result = CliRunner().invoke(main, ["stats", "merge", str(a), str(a), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and not (tmp_path / "m.safetensors").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "count twice" in result.stderr


def test_merge_refuses_a_different_model(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    a = _write(tmp_path / "a.safetensors", model, tensors)
    b = _write(tmp_path / "b.safetensors", dict(model, router_sha256="0" * 64), tensors)
    with pytest.raises(StatsError) as excinfo:
        merge([a, b])
    _assert_one_line_error(excinfo, b, "model.router_sha256", str(a))


def test_merge_refuses_another_major_version(tmp_path: Path, model: Model, tensors: Tensors) -> None:
    a = _write(tmp_path / "a.safetensors", model, tensors)
    b = _write_raw(tmp_path / "b.safetensors", tensors, _metadata(model, default_calibration(), version="2.0"))
    with pytest.raises(StatsError) as excinfo:
        merge([a, b])
    _assert_one_line_error(excinfo, b, "version 2.0")


# ---------------------------------------------------------------------------------------------
# Exports


def _with_dead_expert(model: Model) -> tuple[StatsFile, dict[int, Any]]:
    """Expert 3 of layer 1 is never routed, so its means are undefined."""
    tokens = fake_layers(model, 30, seed=5)
    t = tokens[1]
    t.r[:, 3] = 0.0
    t.g[:, 3] = 0.0
    return StatsFile.from_arrays(model, default_calibration(num_tokens=30), compute_fields(tokens)), tokens


def test_csv_export_matches_formulas(model: Model) -> None:
    sf, tokens = _with_dead_expert(model)
    rows = list(csv.DictReader(io.StringIO(to_csv(sf))))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert len(rows) == 2 * 4
    t = tokens[0]
    routed = t.r[:, 2] > 0
    norms = np.linalg.norm(t.f[routed, 2], axis=1)
    row = rows[2]
    assert (row["layer"], row["expert"]) == ("0", "2")
    assert int(row["count"]) == routed.sum()
    assert float(row["count_share"]) == pytest.approx(routed.sum() / t.r.sum())
    assert float(row["mean_gate"]) == pytest.approx(t.g[routed, 2].mean())
    assert float(row["mean_out_norm"]) == pytest.approx(norms.mean())
    assert float(row["mean_sq_out_norm"]) == pytest.approx((norms**2).mean())
    assert float(row["reap"]) == pytest.approx((t.g[routed, 2] * norms).mean())
    assert float(row["prob_sum"]) == pytest.approx(t.p[:, 2].sum())
    assert float(row["out_norm_max"]) == pytest.approx(norms.max())
    assert float(row["inter_norm_mean"]) == pytest.approx(np.linalg.norm(t.h[routed, 2], axis=1).mean())
    dead = rows[7]
    assert (dead["layer"], dead["expert"], dead["count"], dead["mean_gate"]) == ("1", "3", "0", "")


def test_json_export_holds_metadata_summary_and_tensors(model: Model, tensors: Tensors) -> None:
    sf = StatsFile.from_arrays(model, default_calibration(), tensors)
    doc = json.loads(to_json(sf))
    assert doc["metadata"]["model"] == model
    assert doc["sha256"] == sf.sha256
    assert [entry["layer"] for entry in doc["layers"]] == [0, 1]
    layer1 = doc["layers"][1]
    assert len(layer1["experts"]) == 4
    for name, values in layer1["tensors"].items():
        np.testing.assert_array_equal(np.array(values), tensors[tensor_name(1, name)])
    assert set(layer1["holdout"]) == set(HOLDOUT_FIELDS)


def test_summary_table_counts_dead_experts(model: Model) -> None:
    sf, _ = _with_dead_expert(model)
    lines = summary_table(sf).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "tokens"])
    rows = [line.split() for line in lines[header + 1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("0", "30", "0"), ("1", "30", "1")]


def test_docs_field_table_is_generated_from_schema() -> None:
    assert field_table_markdown() in DOCS.read_text()


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_show_merge_export(tmp_path: Path, model: Model) -> None:
    runner = CliRunner()
    a = _write(tmp_path / "a.safetensors", model, make_stats(model, 10, seed=0), num_tokens=10)
    b = _write(tmp_path / "b.safetensors", model, make_stats(model, 20, seed=1), num_tokens=20)
    out = tmp_path / "m.safetensors"

    shown = runner.invoke(main, ["stats", "show", str(a)])
    assert shown.exit_code == 0, shown.output
    assert "fake_moe" in shown.stdout and "mean gate" in shown.stdout

    merged = runner.invoke(main, ["stats", "merge", str(a), str(b), "-o", str(out)])
    assert merged.exit_code == 0, merged.output
    assert StatsFile(out).calibration["num_tokens"] == 30

    again = runner.invoke(main, ["stats", "merge", str(a), str(b), "-o", str(out)])
    assert again.exit_code == 2
    assert again.stderr.strip().splitlines() == [f"Error: {out}: already exists; pass --overwrite to replace it"]
    replaced = runner.invoke(main, ["stats", "merge", str(a), "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert StatsFile(out).calibration["num_tokens"] == 10

    exported = runner.invoke(main, ["stats", "export", str(a), "--format", "csv"])
    assert exported.exit_code == 0, exported.output
    assert exported.stdout == to_csv(StatsFile(a))

    target = tmp_path / "a.json"
    as_json = runner.invoke(main, ["stats", "export", str(a), "--format", "json", "-o", str(target)])
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stdout == ""
    assert json.loads(target.read_text())["metadata"]["calibration"]["num_tokens"] == 10


@pytest.mark.parametrize("command", ["show", "export", "merge"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    args = [command, str(bad)] + (["-o", str(tmp_path / "out.safetensors")] if command == "merge" else [])
    result = CliRunner().invoke(main, ["stats", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {bad}: ")
    assert not (tmp_path / "out.safetensors").exists()


def test_factory_fields_follow_their_formulas(model: Model) -> None:
    """Cross-checks the fake data itself, since every other test trusts it."""
    t = fake_layers(model, 25, seed=9)[0]
    fields = layer_fields(t)
    np.testing.assert_allclose(np.diag(fields["coselect"]), fields["count"])
    np.testing.assert_allclose(np.diag(fields["gram"]), fields["moment_g"][2, 2])
    np.testing.assert_allclose(fields["moment_g"][0, 0], fields["count"])
    assert fields["count"].sum() == 25 * model["top_k"]
    np.testing.assert_allclose(fields["prob_sum"].sum(), 25.0)


# ---------------------------------------------------------------------------------------------
# MC-Suite fields (optional: out_hist, token_bits with model.vocab_size)

VOCAB = 70  # 9 bytes of 8 token ids, the last one partly used


def _mcsuite_fields(t: Any, ids: np.ndarray) -> Tensors:
    """out_hist and token_bits of one layer straight from per-token data (formulas of the schema)."""
    from collect_reference import _histogram_add

    num_experts = t.r.shape[1]
    hist, bits = np.zeros((num_experts, 513)), np.zeros((num_experts, 9), dtype=np.uint8)
    for n, e in zip(*np.nonzero(t.r)):
        _histogram_add(hist[e], t.f[n, e])
        bits[e, ids[n] // 8] |= 1 << (ids[n] % 8)
    return {"out_hist": hist, "token_bits": bits}


def _with_mcsuite(model: Model, tokens: dict[int, Any], ids: dict[int, np.ndarray]) -> Tensors:
    tensors = compute_fields(tokens)
    for layer, t in tokens.items():
        tensors.update({tensor_name(layer, k): v for k, v in _mcsuite_fields(t, ids[layer]).items()})
    return tensors


@pytest.fixture
def vocab_model(model: Model) -> Model:
    return dict(model, vocab_size=VOCAB)


def test_mcsuite_fields_round_trip_and_merge_exactly(tmp_path: Path, vocab_model: Model) -> None:
    tokens = fake_layers(vocab_model, 40, seed=6)
    rng = np.random.default_rng(6)
    ids = {layer: rng.integers(0, VOCAB, size=40) for layer in tokens}
    ids[0][:5] = VOCAB - 1  # the last id of the vocabulary
    part = lambda sl: ({l: t[sl] for l, t in tokens.items()}, {l: i[sl] for l, i in ids.items()})  # noqa: E731
    a = _write(tmp_path / "a.safetensors", vocab_model, _with_mcsuite(vocab_model, *part(slice(0, 15))))
    b = _write(tmp_path / "b.safetensors", vocab_model, _with_mcsuite(vocab_model, *part(slice(15, 40))))
    assert StatsFile(a).optional_fields == ("out_hist", "token_bits")
    merged = merge([a, b])
    expected = _with_mcsuite(vocab_model, tokens, ids)
    for layer in vocab_model["moe_layers"]:
        np.testing.assert_array_equal(merged.get(layer, "token_bits"), expected[tensor_name(layer, "token_bits")])
        _assert_close(merged.get(layer, "out_hist"), expected[tensor_name(layer, "out_hist")])
        assert merged.get(layer, "token_bits").dtype == np.uint8
    assert merged.get(0, "token_bits")[:, 8].any()  # the last id, 69: bit 5 of byte 8
    assert FIELD_BY_NAME["token_bits"].merge == "or"
    out = tmp_path / "merged.safetensors"
    merged.save(out)
    np.testing.assert_array_equal(StatsFile(out).get(1, "token_bits"), merged.get(1, "token_bits"))


def test_file_without_mcsuite_fields_is_read_and_merges_without_them(tmp_path: Path, model: Model,
                                                                     vocab_model: Model) -> None:
    old = _write(tmp_path / "old.safetensors", model, make_stats(model, 10, seed=0))  # no vocab_size either
    tokens = fake_layers(vocab_model, 10, seed=1)
    new = _write(tmp_path / "new.safetensors", vocab_model,
                 _with_mcsuite(vocab_model, tokens, {layer: np.arange(10) for layer in tokens}))
    assert StatsFile(old).optional_fields == ()
    with pytest.raises(StatsError, match="no tensor layers.0.token_bits"):
        StatsFile(old).get(0, "token_bits")
    merged = merge([new, old])
    assert merged.optional_fields == ()
    np.testing.assert_array_equal(merged.get(0, "count"), StatsFile(old).get(0, "count") + StatsFile(new).get(0, "count"))
    result = CliRunner().invoke(main, ["stats", "merge", str(new), str(old), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output  # documented: kept only when every input has them; but said aloud
    assert "Warning: out_hist, token_bits dropped (not in every input)" in result.stderr


def _mcsuite_tensors(vocab_model: Model) -> Tensors:
    tokens = fake_layers(vocab_model, 12, seed=2)
    return _with_mcsuite(vocab_model, tokens, {layer: np.arange(12) * 5 for layer in tokens})


MALFORMED_MCSUITE = {
    "partial group": (lambda t, m: t.pop("layers.1.out_hist"), ("--histogram tensors are incomplete", "layers.1.out_hist")),
    "no vocab_size": (lambda t, m: m["model"].pop("vocab_size"), ("layers.0.token_bits", "model.vocab_size")),
    "bad vocab_size": (lambda t, m: m["model"].__setitem__("vocab_size", 0), ("model.vocab_size", "positive")),
    "wrong byte count": (lambda t, m: m["model"].__setitem__("vocab_size", 200), ("layers.0.token_bits", "[4, 25]")),
    "bits as F64": (lambda t, m: t.__setitem__("layers.1.token_bits", t["layers.1.token_bits"].astype(np.float64)),
                    ("layers.1.token_bits", "dtype F64, expected U8")),
    "hist as U8": (lambda t, m: t.__setitem__("layers.0.out_hist", t["layers.0.out_hist"].astype(np.uint8)),
                   ("layers.0.out_hist", "dtype U8, expected F64")),
    "negative bin": (_set("layers.0.out_hist", (0, 3), -1.0), ("layers.0.out_hist", "negative")),
}


@pytest.mark.parametrize("case", list(MALFORMED_MCSUITE))
def test_malformed_mcsuite_fields_are_rejected(case: str, tmp_path: Path, vocab_model: Model) -> None:
    _assert_edit_rejected(tmp_path, vocab_model, _mcsuite_tensors(vocab_model), *MALFORMED_MCSUITE[case])


def test_writer_takes_mcsuite_fields_with_a_vocabulary(tmp_path: Path, vocab_model: Model) -> None:
    tensors = _mcsuite_tensors(vocab_model)
    writer = StatsWriter(vocab_model, default_calibration())
    for name, values in tensors.items():
        writer.add(int(name.split(".")[1]), name.split(".")[2], values)
    with pytest.raises(StatsError, match=r"token_bits has shape \[4, 2\], expected \[4, 9\]"):
        StatsWriter(vocab_model, default_calibration()).add(0, "token_bits", np.zeros((4, 2)))
    writer.save(tmp_path / "s.safetensors")
    saved = StatsFile(tmp_path / "s.safetensors")
    for name, values in tensors.items():
        np.testing.assert_array_equal(saved.get(int(name.split(".")[1]), name.split(".")[2]), values)


def test_docs_mcsuite_table_is_generated_from_schema() -> None:
    from stats_formats.schema import MCSUITE_FIELDS

    assert field_table_markdown(MCSUITE_FIELDS) in DOCS.read_text()


@pytest.mark.parametrize(("key", "value"), [("sampling", "truncate"), ("gradients", True), ("gradients", "summed")])
def test_optional_calibration_values_are_checked(key: str, value: object, model: Model, tensors: Tensors) -> None:
    """calibration.sampling and calibration.gradients (absent in older files) take only their documented values."""
    StatsFile.from_arrays(model, {**default_calibration(), "sampling": "documents"}, tensors)
    with pytest.raises(StatsError, match=rf"metadata calibration.{key} is {value!r}, expected one of"):
        StatsFile.from_arrays(model, {**default_calibration(), key: value}, tensors)
