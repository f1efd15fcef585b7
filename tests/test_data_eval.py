"""Text loading (surgery.model.data), evaluation (surgery.eval.perplexity) and the `eval` command."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_tokenizer import save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from surgery.cli import main
from surgery.model.data import (
    DataError,
    build_sequences,
    cap_seq_len,
    eval_windows,
    read_documents,
)
from surgery.eval.perplexity import evaluate, format_report
from surgery.model.load import load_model, load_tokenizer

WORDS = "the a expert router token layer model prune gate weight sparse dense mixture of".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n)]


def write_jsonl(path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def save_tiny_moe(path, seed: int) -> None:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    save_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_tiny_moe(path, seed=0)
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("other")
    save_tiny_moe(path, seed=1)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture
def corpus(tmp_path):
    """Two domains: a .jsonl and a .txt file."""
    a = write_jsonl(tmp_path / "wiki.jsonl", sentences(40, seed=1))
    b = tmp_path / "code.txt"
    b.write_text("\n\n".join(sentences(40, seed=2)) + "\n")
    return [a, str(b)]


# --- reading documents ---------------------------------------------------------------


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 3}\n  \n')
    assert read_documents(p) == ["one", "two\nlines"]


def test_read_txt_splits_on_blank_lines(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first line\nstill first\n\n \nsecond\r\n\r\nthird")
    assert read_documents(p) == ["first line\nstill first", "second", "third"]


def test_read_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    write_jsonl(tmp_path / "a.jsonl", ["A"])
    (tmp_path / "sub" / "c.txt").write_text("C1\n\nC2")
    (tmp_path / "notes.md").write_text("ignored")
    assert read_documents(tmp_path) == ["A", "B", "C1", "C2"]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("empty.txt", b"", "empty file"),
        ("blank.jsonl", b"\n\n", "no documents"),
        ("latin1.txt", b"caf\xe9 au lait", "not UTF-8 text (byte 3)"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'notext.jsonl:2: no "text" field'),
        ("number.jsonl", b'{"text": 5}\n', 'number.jsonl:1: "text" is not a string'),
        ("list.jsonl", b'["text"]\n', "list.jsonl:1: not a JSON object"),
        ("data.csv", b"text\nhello\n", "unknown extension '.csv'"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path, name, content, problem):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_documents(p)
    msg = str(e.value)
    assert str(p) in msg and problem in msg and "\n" not in msg


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_documents(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no .jsonl or .txt files"):
        read_documents(tmp_path)


# --- calibration sequences -----------------------------------------------------------


def test_pack_deterministic_per_seed(corpus, tokenizer):
    a = build_sequences(corpus, tokenizer, num_samples=8, seq_len=32, seed=0)
    b = build_sequences(corpus, tokenizer, num_samples=8, seq_len=32, seed=0)
    c = build_sequences(corpus, tokenizer, num_samples=8, seq_len=32, seed=1)
    assert a.input_ids.shape == (8, 32) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.description() == {
        "sources": corpus, "num_sequences": 8, "num_requested": 8, "num_tokens": 256,
        "seq_len": 32, "seed": 0, "mode": "packed",
    }


def test_pack_mixes_files_with_eos_between_documents(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ["aaaa"] * 10)
    b = write_jsonl(tmp_path / "b.jsonl", ["bbbb"] * 10)
    ids = build_sequences([a, b], tokenizer, num_samples=1, seq_len=99, seed=0).input_ids[0].tolist()
    docs = tokenizer.decode(ids).split("<eos>")
    assert sorted(docs) == ["aaaa"] * 10 + ["bbbb"] * 10
    assert docs != sorted(docs)


def test_pack_runs_out_records_and_warns(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "small.jsonl", ["x" * 50, "y" * 50])  # 101 tokens with EOS
    with pytest.warns(UserWarning, match="ran out after 3 of 10"):
        cal = build_sequences([p], tokenizer, num_samples=10, seq_len=30, seed=0)
    assert cal.num_sequences == 3 and cal.num_requested == 10 and cal.num_tokens == 90


def test_pack_too_short_is_clear(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "tiny.jsonl", ["hello"])
    with pytest.raises(DataError, match=r"only 5 tokens.*--seq-len"):
        build_sequences([p], tokenizer, num_samples=4, seq_len=64, seed=0)


def test_documents_sampling_takes_one_window_per_long_document(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "t.jsonl", ["short", "a long document one", "another long one"])
    with pytest.warns(UserWarning, match="ran out after 2 of 5"):
        cal = build_sequences([p], tokenizer, num_samples=5, seq_len=8, seed=0, mode="documents")
    rows = [tokenizer.decode(r) for r in cal.input_ids.tolist()]
    assert cal.num_requested == 5 and cal.mode == "documents" and len(rows) == 2
    # each row is a window of exactly one long document (no EOS, no packing across documents)
    assert sorted(next(d for d in ("a long document one", "another long one") if r in d) for r in rows) == \
        ["a long document one", "another long one"]
    starts = set()
    for seed in range(8):  # the window's offset is drawn from the seed, not always the document's start
        cal = build_sequences([p], tokenizer, num_samples=2, seq_len=8, seed=seed, mode="documents")
        starts |= {"a long document one".find(tokenizer.decode(r)) for r in cal.input_ids.tolist()}
    assert len(starts - {-1}) > 1
    with pytest.raises(DataError, match=r"no document has 64 tokens \(longest: 19\).*--sampling packed"):
        build_sequences([p], tokenizer, num_samples=5, seq_len=64, seed=0, mode="documents")
    with pytest.raises(ValueError, match="unknown sampling 'truncate'"):
        build_sequences([p], tokenizer, num_samples=5, seq_len=8, seed=0, mode="truncate")


def test_cap_seq_len():
    assert cap_seq_len({"max_position_embeddings": 256}, 512) == 256
    assert cap_seq_len({"text_config": {"max_position_embeddings": 128}}, 512) == 128
    assert cap_seq_len({"max_position_embeddings": 4096}, 512) == 512
    assert cap_seq_len({}, 512) == 512


def test_eval_windows_file_order(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "w.jsonl", ["abcdefgh", "ijklmnop", "qrstuvwx"])  # 26 tokens
    w = eval_windows(p, tokenizer, seq_len=6, max_tokens=20)
    assert w.shape == (3, 6)
    assert tokenizer.decode(w.flatten().tolist()) == "abcdefgh<eos>ijklmnop<eos>"
    assert eval_windows(p, tokenizer, seq_len=6, max_tokens=1000).shape == (4, 6)


# --- evaluation ----------------------------------------------------------------------


def test_perplexity_matches_direct_loss(corpus, model, tokenizer):
    result = evaluate(model, tokenizer, corpus, seq_len=32, max_tokens=224, batch_size=3, progress=False)
    for path, f in zip(corpus, result["files"]):
        windows = eval_windows(path, tokenizer, 32, 224)
        with torch.no_grad():
            expected = math.exp(model(windows, labels=windows).loss.item())
        assert f["file"] == path and f["tokens"] == 224 and f["windows"] == 7
        assert f["ppl"] == pytest.approx(expected, rel=1e-4)
    assert [f["domain"] for f in result["files"]] == ["wiki", "code"]
    geomean = math.exp(sum(math.log(f["ppl"]) for f in result["files"]) / 2)
    assert result["geomean_ppl"] == pytest.approx(geomean, rel=1e-9)
    assert "kl" not in result


def test_kl_against_itself_and_another_model(corpus, model, model_dir, other_model_dir, tokenizer):
    same = evaluate(model, tokenizer, corpus, seq_len=32, max_tokens=128,
                    reference=load_model(model_dir), progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    assert all(f["kl"] == pytest.approx(0.0, abs=1e-6) and f["top1"] == 1.0 for f in same["files"])
    other = evaluate(model, tokenizer, corpus, seq_len=32, max_tokens=128,
                     reference=load_model(other_model_dir), progress=False)
    assert other["kl"] > 1e-4 and other["top1"] < 1.0
    report = format_report(other)
    assert "wiki.jsonl" in report and "top1" in report and "geometric mean ppl" in report


# --- CLI -----------------------------------------------------------------------------


def test_cli_eval_json(corpus, model_dir):
    res = CliRunner().invoke(main, ["eval", 
        str(model_dir), "-d", corpus[0], "-d", corpus[1], "--reference", str(model_dir),
        "--seq-len", "32", "--max-tokens", "64", "--device", "cpu", "--json",
    ])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert [f["domain"] for f in result["files"]] == ["wiki", "code"]
    assert result["top1"] == 1.0 and result["geomean_ppl"] > 1.0


def test_cli_eval_table(corpus, model_dir):
    res = CliRunner().invoke(main, ["eval", str(model_dir), "-d", corpus[0], "--seq-len", "32", "--max-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "geometric mean ppl" in res.stdout


@pytest.mark.parametrize("problem", ["bad data", "missing model"])
def test_cli_errors_are_one_line_exit_2(tmp_path, model_dir, problem):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    model = str(model_dir) if problem == "bad data" else str(tmp_path / "no-model")
    res = CliRunner().invoke(main, ["eval", model, "-d", str(bad)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert (f"{bad}:2: not valid JSON" if problem == "bad data" else "no such model folder") in lines[0]


def test_eval_folder_reports_each_file(tmp_path: Path) -> None:
    """A folder given to `eval -d` stands for its files: one perplexity per file."""
    from surgery.pipeline.evaluate import data_files

    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "a.txt").write_text("y\n")
    (tmp_path / "notes.md").write_text("z\n")
    assert data_files([str(tmp_path), "other.jsonl"]) == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "other.jsonl"]
