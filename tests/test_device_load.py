"""Loading straight to the device (surgery.model.load / surgery.model.weights), prefetched layer
streaming, and the figures `collect` and `eval` report (issue 20)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from stats_formats import StatsFile
from surgery.collect.options import default_holdout
from surgery.collect.run import collect
from surgery.errors import UserError
from surgery.eval.perplexity import evaluate, format_report
from surgery.model.load import load_model, load_tokenizer
from tiny_models import ARCHS, LAYOUTS, build_tiny, tiny_config
from tiny_tokenizer import save_tiny_tokenizer

COLLECTED = [mt for mt in ARCHS if mt != "llama4_text"]  # collect refuses llama4
CASES = [(mt, lay) for mt in ARCHS for lay in LAYOUTS[mt]]
RUN = dict(samples=4, seq_len=24, holdout=2, batch_size=2, seed=3, device="cpu", dtype="float32", progress=False)
WORDS = "expert router token layer model prune gate weight sparse dense the quick brown fox 42 ( ) , ;".split()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("device_load")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    import random

    rng = random.Random(5)
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n"
                            for _ in range(40)))
    return path


@pytest.fixture(scope="module")
def qwen(root: Path) -> Path:
    path = build_tiny("qwen3_moe", root / "qwen3_moe", layout="per-expert")
    save_tiny_tokenizer(path, vocab_size=128)
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))


def _reference(path: Path, dtype: torch.dtype = torch.float32):
    """from_pretrained, with every tensor copied to fresh (aligned) memory: from_pretrained leaves views into
    the memory-mapped shards at unaligned offsets, where CPU float32 kernels round differently (~1e-8)."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        for t in [*ref.parameters(), *ref.buffers()]:
            t.data = t.data.clone()
    return ref


# ---------------------------------------------------------------------------------------------
# 1. The direct loader gives the model from_pretrained gives, bit for bit


@pytest.mark.parametrize("model_type,layout", CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_direct_load_bit_identical_to_from_pretrained(model_type: str, layout: str, root: Path) -> None:
    path = build_tiny(model_type, root / f"eq-{model_type}-{layout}", layout=layout)
    ref = _reference(path)
    got = load_model(path, "cpu", torch.float32)
    assert got.moe_surgery_load_seconds > 0
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert set(ref_state) == set(got_state)
    for name, t in ref_state.items():
        assert got_state[name].dtype == t.dtype and torch.equal(got_state[name], t), name
    for (name, b), (_, g) in zip(ref.named_buffers(), got.named_buffers()):
        assert torch.equal(b, g), name  # rotary inv_freq and the like, recomputed
    with torch.no_grad():
        assert torch.equal(got(_ids()).logits, ref(_ids()).logits)


def test_direct_load_ties_weights_and_keeps_float32_modules(root: Path) -> None:
    """Tied embeddings stay one tensor; in bf16, transformers' `_keep_in_fp32_modules_strict` (DeepSeek-V3's
    router) stay float32, exactly as from_pretrained keeps them."""
    config = tiny_config("deepseek_v3")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    path = root / "tied-v3"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for dtype in (torch.float32, torch.bfloat16):
        ref = _reference(path, dtype)
        got = load_model(path, "cpu", dtype)
        assert got.lm_head.weight is got.model.embed_tokens.weight
        assert {n: t.dtype for n, t in got.state_dict().items()} == {n: t.dtype for n, t in ref.state_dict().items()}
        with torch.no_grad():
            assert torch.equal(got(_ids()).logits, ref(_ids()).logits)


def test_model_too_large_for_the_device_is_refused_up_front(qwen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.model.load as load

    monkeypatch.setattr(load, "free_bytes", lambda device: 1000)
    with pytest.raises(UserError, match=r"--stream-layers"):
        load_model(qwen, "cpu", torch.float32)


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from surgery.model.load import load_model
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(sys.argv[1], "cpu", torch.float32)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew": (after - before) * 1024, "weights": sum(t.nbytes for t in model.state_dict().values())}))
""")


def test_direct_load_holds_no_second_copy(tmp_path: Path) -> None:
    """Peak host memory while loading a 98 MiB model onto the CPU grows by the model (its own tensors on that
    device) plus less than 48 MiB: the weights are read into place, never staged whole, never memory-mapped."""
    layers, hidden, experts, inter = 4, 256, 32, 256
    config = tiny_config("qwen3_moe").to_dict()
    config.update(num_hidden_layers=layers, hidden_size=hidden, num_local_experts=experts, moe_intermediate_size=inter,
                  intermediate_size=512, mlp_only_layers=[], vocab_size=128, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    shards = []
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
             p + "self_attn.q_norm.weight": torch.ones(32), p + "self_attn.k_norm.weight": torch.ones(32),
             p + "self_attn.q_proj.weight": torch.randn(4 * 32, hidden, generator=gen),
             p + "self_attn.k_proj.weight": torch.randn(2 * 32, hidden, generator=gen),
             p + "self_attn.v_proj.weight": torch.randn(2 * 32, hidden, generator=gen),
             p + "self_attn.o_proj.weight": torch.randn(hidden, 4 * 32, generator=gen),
             p + "mlp.gate.weight": torch.randn(experts, hidden, generator=gen)}
        for e in range(experts):
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                t[f"{p}mlp.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=gen)
        shards.append(t)
    shards[0].update({"model.embed_tokens.weight": torch.randn(128, hidden, generator=gen),
                      "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(128, hidden, generator=gen)})
    from tiny_models import write_checkpoint

    write_checkpoint(tmp_path, config, shards)
    del shards
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["weights"] > 90 * 2**20
    assert figures["grew"] < figures["weights"] + 48 * 2**20, figures


# ---------------------------------------------------------------------------------------------
# 2. Prefetched streaming computes exactly what streaming without prefetch computes


@pytest.mark.parametrize("model_type,layout", [("qwen3_moe", "per-expert"), ("mixtral", "fused"),
                                               ("deepseek_v3", "per-expert")])
def test_prefetched_stream_same_file_bit_for_bit(model_type: str, layout: str, root: Path, data_file: Path) -> None:
    path = build_tiny(model_type, root / f"pf-{model_type}-{layout}", layout=layout)
    save_tiny_tokenizer(path, vocab_size=128)
    files = {}
    for prefetch in (True, False):
        out = root / f"pf-{model_type}-{layout}-{prefetch}.safetensors"
        collect(path, [str(data_file)], out, stream_layers=True, prefetch=prefetch, **RUN)
        files[prefetch] = StatsFile(out)
    a, b = files[True], files[False]
    assert a.calibration["timing"]["prefetch"] is True and b.calibration["timing"]["prefetch"] is False
    assert a.layers == b.layers
    for holdout in (False, True):
        for layer in a.layers:
            got, want = a.layer(layer, holdout=holdout), b.layer(layer, holdout=holdout)
            assert sorted(got) == sorted(want) and got
            for name, x in got.items():
                assert x.dtype == want[name].dtype and x.tobytes() == want[name].tobytes(), (holdout, layer, name)


# ---------------------------------------------------------------------------------------------
# 3. Honest figures, the output checked first, the default hold-out


def test_printed_throughput_is_tokens_over_compute_time(qwen: Path, data_file: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "stats.safetensors"
    result = cli("collect", qwen, "-d", data_file, "-o", out, "--samples", "4", "--seq-len", "24", "--holdout", "2",
                 "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    timing = StatsFile(out).calibration["timing"]
    calib = StatsFile(out).calibration
    assert timing["tokens_processed"] == calib["num_tokens"] + 2 * 24
    assert timing["mode"] == "in memory"  # auto: a tiny model fits
    printed = re.search(r"\((\d+) tokens/s over all (\d+) tokens", result.output)
    assert printed and int(printed[2]) == timing["tokens_processed"]
    rate = timing["tokens_processed"] / timing["compute_seconds"]
    stored_to = 0.5e-6 / timing["compute_seconds"]  # compute_seconds is stored rounded to the microsecond
    assert abs(int(printed[1]) - rate) <= 0.5 + rate * stored_to + 1e-3
    loaded = re.search(r"Loaded the model in ([\d.]+) s", result.output)
    assert loaded and abs(float(loaded[1]) - timing["load_seconds"]) <= 0.05 + 1e-9


def test_stream_layers_flag_and_auto(qwen: Path, data_file: Path, tmp_path: Path, cli,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--stream-layers still means on; without it, auto streams only a model that does not fit."""
    import surgery.model.load as load

    args = ["-d", data_file, "--samples", "2", "--seq-len", "24", "--holdout", "0", "--device", "cpu",
            "--dtype", "float32"]
    on = cli("collect", qwen, *args, "-o", tmp_path / "on.safetensors", "--stream-layers")
    assert on.exit_code == 0, on.output
    assert StatsFile(tmp_path / "on.safetensors").calibration["timing"]["mode"] == "streamed"
    monkeypatch.setattr(load, "free_bytes", lambda device: 1000)
    auto = cli("collect", qwen, *args, "-o", tmp_path / "auto.safetensors")
    assert auto.exit_code == 0, auto.output
    assert StatsFile(tmp_path / "auto.safetensors").calibration["timing"]["mode"] == "streamed"
    off = cli("collect", qwen, *args, "-o", tmp_path / "off.safetensors", "--no-stream-layers")
    assert off.exit_code == 2 and "--stream-layers" in off.output


def test_eval_reports_load_and_compute_separately(qwen: Path, data_file: Path) -> None:
    model = load_model(qwen, "cpu", torch.float32)
    ref = load_model(qwen, "cpu", torch.float32)
    result = evaluate(model, load_tokenizer(qwen), [str(data_file)], seq_len=16, max_tokens=256, reference=ref,
                      progress=False)
    t = result["timing"]
    assert t["tokens_processed"] == sum(f["tokens"] for f in result["files"])
    assert t["load_seconds"] == pytest.approx(model.moe_surgery_load_seconds + ref.moe_surgery_load_seconds, abs=1e-5)
    assert t["tokens_per_second"] == pytest.approx(t["tokens_processed"] / t["compute_seconds"], rel=1e-3)
    assert "tokens/s" in format_report(result)


@pytest.mark.parametrize("case", ["missing-folder", "parent-is-file", "read-only"])
def test_unwritable_output_refused_before_any_work(case: str, qwen: Path, data_file: Path, tmp_path: Path, cli,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.collect.run as run

    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    called = []
    monkeypatch.setattr(run, "_setup", lambda *a, **k: called.append(1))
    monkeypatch.setattr("surgery.hub.client.resolve_model", lambda *a, **k: called.append(1))
    if case == "missing-folder":
        out = tmp_path / "nope" / "stats.safetensors"
    elif case == "parent-is-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "stats.safetensors"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "stats.safetensors"
    result = cli("collect", qwen, "-d", data_file, "-o", out, "--device", "cpu")
    assert result.exit_code == 2 and str(out) in result.output and not called, result.output
    with pytest.raises(UserError):
        collect(qwen, [str(data_file)], out, **RUN)
    assert not called


def test_default_holdout_scales_with_samples(qwen: Path, data_file: Path, tmp_path: Path, cli) -> None:
    assert [default_holdout(n) for n in (1, 8, 16, 64, 256, 1024)] == [1, 1, 2, 8, 32, 32]
    out = tmp_path / "s.safetensors"
    result = cli("collect", qwen, "-d", data_file, "-o", out, "--samples", "8", "--seq-len", "24", "--device", "cpu",
                 "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert StatsFile(out).calibration["holdout_sequences"] == 1
    assert "samples // 8" in " ".join(cli("collect", "--help").output.split())
