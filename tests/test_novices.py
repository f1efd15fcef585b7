"""MoNE novices (`prune --novices`): the written checkpoint matches what vLLM's loader reads, and
the project's loader gives the logits of the original model whose pruned experts output g_i·mu_i.

The reference is computed here, independently of surgery.rewrite.novices and surgery.model.novices: the
original model with novice slots' combine weights zeroed inside each experts call and Σ g·mu added,
mu taken straight from the statistics file (out_sum / count) with numpy.
"""

from __future__ import annotations

import json
import shutil
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from stats_formats import FIELDS, StatsFile
from stats_formats.schema import tensor_name
from surgery.collect.run import collect
from surgery.errors import UserError
from surgery.model.load import load_model as eval_load_model
from surgery.model import load_model as load_novices
from surgery.plan import Plan
from surgery.rewrite.novices import NoviceError, encode, write_novice_checkpoint
from tiny_models import ARCHS, LAYOUTS, build_tiny, checkpoint_bytes, load_model, moe_blocks
from tiny_tokenizer import save_tiny_tokenizer

NOVICE_ARCHS = [mt for mt in ARCHS if "per-expert" in LAYOUTS[mt]]  # vLLM substitutes per-expert checkpoints only
DROP = [1, 4, 6]  # novices in every MoE layer (of 8 experts)
TOL = 1e-5
RUN = dict(samples=4, seq_len=24, holdout=0, batch_size=2, seed=3, progress=False)

# What vLLM reads (vllm/model_executor/layers/fused_moe/expert_substitution.py):
#   APPROX_VALUE_SUFFIX = ".approx_value"
#   for name in ("hf_text_config", "hf_config"): approximate = getattr(config, "approximate_experts", None)
#   experts_path, _, expert_id = name.removesuffix(APPROX_VALUE_SUFFIX).rpartition(".")
#   layer_idx = decoder_layer_index(experts_path)   # the only integer component of the path
VLLM_CONFIG_KEY = "approximate_experts"
VLLM_SUFFIX = ".approx_value"


def vllm_parse_value_name(name: str) -> tuple[int, int] | None:
    """vLLM's `_parse_approx_value_name`: (layer, expert id) of an approx_value tensor name."""
    if not name.endswith(VLLM_SUFFIX):
        return None
    experts_path, _, expert_id = name.removesuffix(VLLM_SUFFIX).rpartition(".")
    indices = [int(p) for p in experts_path.split(".") if p.isdigit()]
    if len(indices) != 1 or not expert_id.isdigit():
        return None
    return indices[0], int(expert_id)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("novices")


@pytest.fixture(scope="module")
def data_file(root: Path) -> Path:
    rng = random.Random(11)
    words = "expert router token layer prune gate weight sparse dense mixture the a and 42 7 ( ) , ; fox dog".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) for _ in range(60)]
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def model_and_stats(root: Path, data_file: Path) -> Callable[[str], tuple[Path, Path]]:
    """`get(model_type)`: a tiny per-expert checkpoint with a tokenizer and its statistics file, built once."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in cache:
            path = build_tiny(model_type, root / model_type, layout="per-expert")
            save_tiny_tokenizer(path, vocab_size=128)
            stats = root / f"{model_type}.stats.safetensors"
            collect(path, [str(data_file)], stats, **RUN)
            cache[model_type] = path, stats
        return cache[model_type]

    return get


def _plan(stats: StatsFile, num_experts: int = 8) -> Plan:
    return Plan({layer: [i for i in range(num_experts) if i not in DROP] for layer in stats.layers})


def _write(model_dir: Path, stats_path: Path, out: Path) -> StatsFile:
    stats = StatsFile(stats_path)
    write_novice_checkpoint(model_dir, _plan(stats), stats, out, overwrite=True)
    return stats


def _reference_logits(model_dir: Path, stats: StatsFile, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Original model; in each MoE layer the DROP experts' slots get weight 0 and `scale`·g·mu is added."""
    model = load_model(model_dir)
    for layer, block in moe_blocks(model).items():
        count = stats.get(layer, "count")
        mu = stats.get(layer, "out_sum") / np.maximum(count, 1)[:, None]
        table = torch.zeros(mu.shape[0] + 1, mu.shape[1])
        table[DROP] = torch.from_numpy(mu[DROP].astype(np.float32)) * scale
        original = block.experts.forward

        def forward(x, idx, w, *args, _orig=original, _table=table, **kwargs):
            novice = torch.isin(idx, torch.tensor(DROP))
            out = _orig(x, idx, torch.where(novice, torch.zeros_like(w), w), *args, **kwargs)
            return out + (w[..., None] * _table[idx.clamp(0, len(_table) - 1)]).sum(1)

        block.experts.forward = forward
    with torch.no_grad():
        return model(input_ids).logits


def _input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("model_type", NOVICE_ARCHS)
def test_logits_equal_original_with_constant_experts(model_type, model_and_stats, root):
    model_dir, stats_path = model_and_stats(model_type)
    out = root / f"{model_type}-novices"
    stats = _write(model_dir, stats_path, out)
    ids = _input_ids()
    with torch.no_grad():
        ours = load_novices(out, dtype=torch.float32)(ids).logits
    expected = _reference_logits(model_dir, stats, ids)
    assert (ours - expected).abs().max().item() <= TOL
    removed = _reference_logits(model_dir, stats, ids, scale=0.0)  # plain removal: the novices must matter
    assert (expected - removed).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_checkpoint_format_is_what_vllm_reads(model_type, model_and_stats, root):
    model_dir, stats_path = model_and_stats(model_type)
    out = root / f"{model_type}-format"
    stats = _write(model_dir, stats_path, out)
    src_cfg = json.loads((model_dir / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[VLLM_CONFIG_KEY] == {str(layer): DROP for layer in stats.layers}
    assert {k: v for k, v in cfg.items() if k != VLLM_CONFIG_KEY} == src_cfg  # expert count and all else unchanged
    before, after = checkpoint_bytes(model_dir), checkpoint_bytes(out)
    values = {vllm_parse_value_name(n): (n, t) for n, t in after.items() if n.endswith(VLLM_SUFFIX)}
    assert set(values) == {(layer, i) for layer in stats.layers for i in DROP}
    for (layer, i), (name, (dtype, shape, raw)) in values.items():
        assert shape == [src_cfg["hidden_size"]] and dtype == "F32"
        mu = stats.get(layer, "out_sum")[i] / max(stats.get(layer, "count")[i], 1)  # never routed: zeros
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), mu.astype(np.float32))
        assert not [n for n in after if n.startswith(name.removesuffix("approx_value")) and n != name]
    novice_prefixes = tuple(n.removesuffix("approx_value") for n, _ in values.values())
    kept = {n: t for n, t in before.items() if not n.startswith(novice_prefixes)}
    assert {n: t for n, t in after.items() if not n.endswith(VLLM_SUFFIX)} == kept  # bytes, names, router rows


def test_bf16_values_round_to_nearest_even():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-3, 3, 4096)).astype(np.float32)
    ties = (rng.integers(0, 1 << 16, 64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway cases
    x = np.concatenate([x, ties[np.isfinite(ties)]])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    assert encode(x, "BF16") == want
    small = x[:4096]  # the random-bit ties overflow float16
    assert encode(small, "F16") == torch.from_numpy(small).half().view(torch.int16).numpy().astype("<i2").tobytes()


def test_bf16_checkpoint_gets_bf16_values(model_and_stats, root):
    model_dir, stats_path = model_and_stats("qwen3_moe")
    bf16_dir = root / "qwen3_moe-bf16"
    load_model(model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    (bf16_dir / "tokenizer_config.json").write_text("{}\n")
    stats = _write(bf16_dir, stats_path, root / "qwen3_moe-bf16-novices")
    after = checkpoint_bytes(root / "qwen3_moe-bf16-novices")
    name = f"model.layers.{stats.layers[0]}.mlp.experts.{DROP[0]}.approx_value"
    dtype, _, raw = after[name]
    mu = stats.get(stats.layers[0], "out_sum")[DROP[0]] / stats.get(stats.layers[0], "count")[DROP[0]]
    assert dtype == "BF16"
    assert raw == torch.from_numpy(mu.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def test_unrouted_expert_gets_zero_vector(model_and_stats, root):
    model_dir, stats_path = model_and_stats("olmoe")
    stats = StatsFile(stats_path)
    tensors = {tensor_name(layer, f.name): stats.get(layer, f.name).copy() for layer in stats.layers for f in FIELDS}
    layer = stats.layers[0]
    for field in ("count", "out_sum"):  # expert DROP[0] never routed in the first MoE layer
        tensors[tensor_name(layer, field)][DROP[0]] = 0
    edited = StatsFile.from_arrays(stats.model, stats.calibration, tensors)
    out = root / "olmoe-unrouted"
    write_novice_checkpoint(model_dir, _plan(stats), edited, out, overwrite=True)
    info = json.loads((out / "pruning.json").read_text())
    assert info["novices_unrouted"] == {str(layer): [DROP[0]]}
    _, _, raw = checkpoint_bytes(out)[f"model.layers.{layer}.mlp.experts.{DROP[0]}.approx_value"]
    assert not np.frombuffer(raw, "<f4").any()


def test_cli_prune_novices_eval_and_collect(model_and_stats, root, cli, data_file):
    model_dir, stats_path = model_and_stats("qwen2_moe")
    out = root / "qwen2_moe-cli"
    r = cli("prune", model_dir, "--stats", stats_path, "--criterion", "frequency", "--ratio", "0.25", "--novices",
            "-o", out)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "pruning.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert {k: len(v) for k, v in info["novices"].items()} == {str(layer): 2 for layer in StatsFile(stats_path).layers}
    assert cfg[VLLM_CONFIG_KEY] == info["novices"] and cfg["num_experts"] == 8
    mem = info["memory"]
    n_novices = sum(len(v) for v in info["novices"].values())
    assert mem["novice_params"] == n_novices * cfg["hidden_size"]
    assert mem["params_after"] < mem["params_before"] and mem["bytes_after"] < mem["bytes_before"]
    assert mem["bytes_after"] == sum(t[2].__len__() for t in checkpoint_bytes(out).values())
    assert (out / "README.md").is_file()
    ids = _input_ids()
    with torch.no_grad():
        a = eval_load_model(out, dtype=torch.float32)(ids).logits
        b = load_novices(out, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)
    collected = root / "qwen2_moe-cli.stats.safetensors"
    collect(out, [str(data_file)], collected, **RUN)  # the collector's self-check passes on novices
    assert StatsFile(collected).layers == StatsFile(stats_path).layers


def test_streaming_collect_runs_the_novices(model_and_stats, root, data_file):
    """--stream-layers loads novices as zero weights plus their gated constants: the same statistics as the in-memory
    loader, which test_logits_equal_original_with_constant_experts checks against a direct computation."""
    model_dir, stats_path = model_and_stats("qwen3_moe")
    out = root / "qwen3_moe-stream"
    _write(model_dir, stats_path, out)
    streamed, plain = root / "stream.stats.safetensors", root / "plain.stats.safetensors"
    collect(out, [str(data_file)], streamed, stream_layers=True, dtype="float32", **RUN)
    collect(out, [str(data_file)], plain, stream_layers=False, dtype="float32", **RUN)
    a, e = StatsFile(streamed)._source.all_tensors(), StatsFile(plain)._source.all_tensors()
    assert sorted(a) == sorted(e)
    for name in e:
        x, y = np.asarray(a[name], np.float64), np.asarray(e[name], np.float64)
        assert np.allclose(x, y, rtol=1e-4, atol=1e-5 * max(float(np.abs(y).max()), 1e-12)), name


def test_cli_novices_needs_stats(model_and_stats, root, cli):
    model_dir, _ = model_and_stats("qwen2_moe")
    r = cli("prune", model_dir, "--criterion", "weight_norm", "--ratio", "0.25", "--novices", "-o", root / "x")
    assert r.exit_code == 2 and "--novices needs --stats" in r.stderr


@pytest.mark.parametrize("model_type,layout", [
    ("qwen3_moe", "fused"), ("gpt_oss", "fused"), ("granitemoe", "fused"), ("llama4_text", "fused"),
])
def test_refuses_what_vllm_cannot_serve(model_type, layout, tiny, root):
    path = tiny(model_type, layout)
    plan = Plan({layer: [0, 2, 3, 5, 7] for layer in _moe_layers(path)})
    with pytest.raises(NoviceError, match="fused|router weight"):
        write_novice_checkpoint(path, plan, None, root / f"{model_type}-refused", overwrite=True)


def test_refuses_quantized_and_novice_inputs(model_and_stats, root):
    model_dir, stats_path = model_and_stats("qwen3_moe")
    stats = StatsFile(stats_path)
    quant = root / "qwen3_moe-quantized-config"
    _copy_with_config(model_dir, quant, {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(NoviceError, match="quantized"):
        write_novice_checkpoint(quant, _plan(stats), stats, root / "q-out", overwrite=True)
    novice = root / "qwen3_moe-twice"
    _write(model_dir, stats_path, novice)
    with pytest.raises(NoviceError, match="already a novice checkpoint"):
        write_novice_checkpoint(novice, _plan(stats), stats, root / "twice-out", overwrite=True)
    with pytest.raises(NoviceError, match="keeps no expert"):
        write_novice_checkpoint(model_dir, Plan({stats.layers[0]: []}), stats, root / "none-out", overwrite=True)


def _moe_layers(path: Path) -> list[int]:
    from surgery.architectures import resolve
    from surgery.io import Checkpoint

    ckpt = Checkpoint(path)
    try:
        return list(resolve(ckpt.config, ckpt.names()).layers)
    finally:
        ckpt.close()


def _copy_with_config(src: Path, dst: Path, extra: dict) -> None:
    shutil.copytree(src, dst)  # copies, not links: links out of a checkpoint folder are refused
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **extra}))
