"""Healing at scale: `heal --lora R` (adapters merged into a plain checkpoint), the memory estimate and
its up-front refusal, `--recipe moe-pruner`'s balanced loss, the expert-by-expert layer-local fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery.architectures import get_spec
from surgery.cli import main
from surgery.eval.perplexity import evaluate
from surgery.model.blocks import find_blocks
from surgery.model.load import load_tokenizer
from surgery.refine.heal import lora as lora_module
from surgery.refine.heal.memory import ModelSizes, needed_bytes
from surgery.refine.heal.pairing import HealError
from surgery.refine.heal.run import HealOptions, heal
from test_heal import FAST, _docs, _jsonl, _student, _teacher
from tiny_models import load_model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heal-scale")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return _jsonl(root / "calib.jsonl", _docs(11, 120))


@pytest.fixture(scope="module")
def eval_file(root: Path) -> Path:
    return _jsonl(root / "eval.jsonl", _docs(99, 40))


@pytest.fixture(scope="module")
def pair(root: Path) -> tuple[Path, Path]:
    teacher = _teacher(root, "qwen3_moe", "fused")
    return teacher, _student(root, teacher)


def _kl(models: list[Path], teacher: Path, eval_file: Path) -> list[float]:
    tok, ref = load_tokenizer(teacher), load_model(teacher)
    return [evaluate(load_model(m), tok, [str(eval_file)], seq_len=24, max_tokens=480, reference=ref,
                     progress=False)["kl"] for m in models]


# ---------------------------------------------------------------------------------------------
# --lora


def test_lora_lowers_held_out_kl_and_writes_the_merged_adapters(root: Path, pair, data: Path, eval_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, student = pair
    seen: list[lora_module.LoRABlocks] = []
    original = lora_module.LoRABlocks.merged

    def capture(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(lora_module.LoRABlocks, "merged", capture)
    out = root / "healed-lora"
    record = heal(student, teacher, [str(data)], out, HealOptions(local_steps=0, kd_steps=12, lr=3e-3, lora=4, **FAST))
    stage = record["stages"][0]
    assert stage["lora_rank"] == 4 and stage["held_out_kl_after"] < stage["held_out_kl_before"], stage
    kl = _kl([student, out], teacher, eval_file)
    assert kl[1] < kl[0], kl

    (lora,) = seen
    before, after = load_model(student), load_model(out)
    spec = get_spec("qwen3_moe")
    checked = 0
    for b in find_blocks(after, spec):
        name = f"{b.name}.experts"
        for pname in ("gate_up_proj", "down_proj"):
            adapter = lora.adapters.get(f"{name}.{pname}")
            if adapter is None:
                continue
            expected = before.get_parameter(f"{name}.{pname}") + adapter.scale * (adapter.B @ adapter.A).detach()
            assert not torch.equal(expected, before.get_parameter(f"{name}.{pname}"))
            torch.testing.assert_close(after.get_parameter(f"{name}.{pname}"), expected, rtol=0, atol=1e-6)
            checked += 1
        router = f"{b.name}.{spec.router_module}.weight"
        if checked:
            assert torch.equal(after.get_parameter(router), lora.params[router].detach().float())
    assert checked == 2 * len(lora.blocks) > 0
    # every other tensor is the student's own
    touched = set(lora.merged())
    for name, p in after.named_parameters():
        if name not in touched:
            assert torch.equal(p, before.get_parameter(name)), name


def test_lora_local_stage_lowers_every_block_error(root: Path, pair, data: Path) -> None:
    teacher, student = pair
    record = heal(student, teacher, [str(data)], root / "healed-lora-local",
                  HealOptions(local_steps=30, kd_steps=0, local_inputs="teacher", lora=8, **FAST))
    layers = record["stages"][0]["layers"]
    assert layers and all(v["lora_rank"] == 8 for v in layers.values())
    assert all(v["held_out_error_after"] < v["held_out_error_before"] for v in layers.values()), layers


def test_lora_refuses_what_it_cannot_do(root: Path, pair, data: Path) -> None:
    teacher, student = pair
    with pytest.raises(HealError, match="--train all"):
        heal(student, teacher, [str(data)], root / "lora-all", HealOptions(lora=4, train="all", **FAST))
    assert not (root / "lora-all").exists()


# ---------------------------------------------------------------------------------------------
# Memory


SIZES = ModelSizes(student=1000, teacher=1500, trainable=600, router=10, adapters_per_rank=20, largest_layer=300,
                   largest_block=310, largest_expert=70, layer=400, hidden=8, layers=2, vocab=50, routed_width=16)


def test_memory_formula_term_by_term() -> None:
    common = dict(batch_tokens=4, local_tokens=100, local=False, distill=True)
    full = needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=False, **common)
    act = 4 * (2 * (16 * 8 + 3 * 16) * 2 + 16 * 50)
    # optimizer: gradient + 2 AdamW states (12 bytes) + the float32 best-state copy (4)
    assert full["weights"] == 4 * 1000 + 2 * 1500 and full["optimizer"] == 16 * 600 and full["activations"] == act
    assert full["casts"] == 2 * 600  # bf16 autocast copies of the float32 masters
    assert full["total"] == 4 * 1000 + 2 * 1500 + 16 * 600 + 2 * 600 + act
    assert needed_bytes(SIZES, dtype_bytes=4, lora=0, train_all=False, **common)["casts"] == 0
    assert needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=True, **common)["optimizer"] == 16 * 1000
    bf16_copy = needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=False, snapshot_bytes=2, **common)
    assert bf16_copy["optimizer"] == 14 * 600
    lora = needed_bytes(SIZES, dtype_bytes=2, lora=8, train_all=False, **common)
    assert lora["weights"] == 2 * 1000 + 2 * 300 + 2 * 1500 and lora["optimizer"] == 20 * (8 * 20 + 10)
    assert lora["total"] < full["total"]
    sharded = needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=False, world=4, **common)
    assert sharded["weights"] == full["weights"] // 4 and sharded["optimizer"] == full["optimizer"] // 4
    assert sharded["activations"] == act // 4
    local = needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=False, **{**common, "local": True, "distill": False})
    assert local["total"] == 2 * 2 * 400 + 16 * 310 + 4 * 100 * 8 * 2
    by_expert = needed_bytes(SIZES, dtype_bytes=2, lora=0, train_all=False, local_fit="experts",
                             **{**common, "local": True, "distill": False})
    assert by_expert["local_block"] == 2 * 310 + 16 * 70 < local["local_block"]


def test_local_cache_estimate_counts_the_tokens_read() -> None:
    """The local stage caches at most what --tokens reads (x4 with teacher samples), not --local-tokens."""
    from types import SimpleNamespace

    from surgery.refine.heal.memory import _local_tokens

    opts = dict(local_tokens=262144, synthesize=False)
    assert _local_tokens(SimpleNamespace(tokens=None, **opts)) == 262144
    assert _local_tokens(SimpleNamespace(tokens=16384, **opts)) == 16384
    assert _local_tokens(SimpleNamespace(tokens=16384, **{**opts, "synthesize": True})) == 4 * 16384
    assert _local_tokens(SimpleNamespace(tokens=10**7, **opts)) == 262144


@pytest.mark.parametrize("extra", [[], ["--lora", "4"], ["--local-steps", "0"]])
def test_heal_refuses_up_front_when_the_budget_is_too_small(root: Path, pair, data: Path, extra: list[str]) -> None:
    teacher, student = pair
    out = root / f"too-small{len(extra)}"
    result = CliRunner().invoke(main, ["heal", str(student), "--teacher", str(teacher), "-d", str(data), "-o", str(out),
                                       "--device", "cpu", "--seq-len", "24", "--memory-budget", "0.0001", *extra])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs about" in lines[0] and "--memory-budget" in lines[0], result.output
    assert ("--lora 4" in lines[0]) == ("--lora" in extra)
    # the stage that runs out is named with its own terms: here the local stage's cache of 262,144 tokens,
    # and with the stage off, distillation's terms only
    stage = "distillation (weights" if "--local-steps" in extra else "layer-local stage (layers"
    assert f"in its {stage}" in lines[0] and ("cache" in lines[0]) == ("--local-steps" not in extra), lines[0]
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------------------------------------
# --recipe moe-pruner


def test_moe_pruner_recipe_balances_its_terms_and_lowers_held_out_loss(root: Path, pair, data: Path,
                                                                        eval_file: Path) -> None:
    teacher, student = pair
    out = root / "healed-moe-pruner"
    record = heal(student, teacher, [str(data)], out, HealOptions(kd_steps=12, recipe="moe-pruner", lr=1e-3, **FAST))
    (stage,) = record["stages"]  # no layer-local stage in the paper's recipe
    assert stage["recipe"] == "moe-pruner" and stage["train"] == "all"
    assert stage["first_expert_loss"] > 0
    assert stage["lambda"] * stage["first_expert_loss"] == pytest.approx(stage["first_ce"], rel=1e-6)
    assert stage["held_out_kl_after"] < stage["held_out_kl_before"], stage
    assert any("embed_tokens" in n for n in record["tensors_written"])  # a full-parameter fine-tune
    tok = load_tokenizer(teacher)
    nll = [evaluate(load_model(m), tok, [str(eval_file)], seq_len=24, max_tokens=480, progress=False)["geomean_ppl"]
           for m in (student, out)]
    assert nll[1] < nll[0], nll


# ---------------------------------------------------------------------------------------------
# Expert-by-expert layer-local fit


def test_expert_by_expert_local_fit_lowers_every_block_error(root: Path, pair, data: Path) -> None:
    from test_heal import _block_error

    teacher, student = pair
    out = root / "healed-expertwise"
    record = heal(student, teacher, [str(data)], out,
                  HealOptions(local_steps=40, kd_steps=0, local_inputs="teacher", local_fit="experts", **FAST))
    assert record["local_fit"] == "experts"
    layers = record["stages"][0]["layers"]
    assert layers and all(v["fit"] == "experts" and v["experts"] for v in layers.values())
    assert all(v["held_out_error_after"] < v["held_out_error_before"] for v in layers.values()), layers
    ids = torch.tensor([load_tokenizer(teacher)(" ".join(_docs(5, 10)))["input_ids"][:96]])
    before, after = _block_error(student, teacher, ids), _block_error(out, teacher, ids)
    assert set(before) == {int(k) for k in layers}
    assert all(after[layer] < before[layer] for layer in before), (before, after)


def test_auto_local_fit_goes_expert_by_expert_when_the_block_does_not_fit(root: Path, pair, data: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget between the two local estimates: the joint fit is refused, the expert-by-expert one runs."""
    from surgery.refine.heal import memory

    teacher, student = pair
    fast = {**FAST, "local_tokens": 24 * 16}
    from surgery.refine.heal.pairing import pair as open_pair

    with open_pair(student, teacher) as p:
        sizes = memory.model_sizes(p)
    common = dict(dtype_bytes=4, lora=0, train_all=False, batch_tokens=4 * 24, local_tokens=fast["local_tokens"],
                  local=True, distill=False)
    joint = memory.needed_bytes(sizes, local_fit="joint", **common)["total"]
    experts = memory.needed_bytes(sizes, local_fit="experts", **common)["total"]
    assert experts < joint
    budget = (joint + experts) / 2 / memory.GIB
    record = heal(student, teacher, [str(data)], root / "healed-auto",
                  HealOptions(local_steps=5, kd_steps=0, local_inputs="teacher", memory_budget=budget, **fast))
    assert record["local_fit"] == "experts"


# ---------------------------------------------------------------------------------------------
# Sharded distillation (torchrun, FSDP2, gloo on CPU)


def test_two_ranks_heal_the_same_weights_as_one_and_write_one_output(root: Path, pair, data: Path) -> None:
    import os
    import subprocess
    import sys

    from tiny_models import checkpoint_bytes

    teacher, student = pair
    # 17 sequences: 16 to train on (4 batches of 4, split 2 + 2), 1 held out
    args = ["--local-steps", "5", "--kd-steps", "4", "--lr", "3e-3", "--tokens", str(24 * 17), "--seq-len", "24",
            "--batch-size", "4", "--local-tokens", str(24 * 16), "--local-inputs", "teacher", "--device", "cpu"]
    one = root / "sharded-1"
    heal(student, teacher, [str(data)], one, HealOptions(local_steps=5, kd_steps=4, lr=3e-3, local_inputs="teacher",
                                                         **{**FAST, "tokens": 24 * 17}))
    parent = root / "sharded"
    parent.mkdir()
    two = parent / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "surgery.cli", "heal", str(student), "--teacher", str(teacher), "-d", str(data),
                             "-o", str(two), *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in parent.iterdir()] == ["out"]  # one output, no leftovers
    assert result.stdout.count("Wrote ") == 1  # only rank 0 writes (and reports)
    import json

    record = json.loads((two / "pruning.json").read_text())["heal"]
    assert record["ranks"] == 2 and [s["stage"] for s in record["stages"]] == ["local", "distill"]
    assert record["stages"][1]["tokens"] == 4 * 4 * 24  # both ranks' tokens
    a, b = load_model(one).state_dict(), load_model(two).state_dict()
    changed = 0
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5, msg=name)
        changed += int(not torch.equal(value, load_model(student).state_dict()[name])) if "experts" in name else 0
    assert changed
    assert checkpoint_bytes(two).keys() == checkpoint_bytes(one).keys()


def test_sharded_heal_refuses_what_runs_on_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.refine.heal.distributed import World, check_sharded

    with pytest.raises(HealError, match="one process"):
        check_sharded(World(0, 2), HealOptions(lora=4), sparsified=False)
    with pytest.raises(HealError, match="multiple of the 2 ranks"):
        check_sharded(World(0, 2), HealOptions(batch_size=3), sparsified=False)
    check_sharded(World(0, 2), HealOptions(batch_size=4), sparsified=False)


def test_best_state_copy_is_bf16_only_when_every_trained_tensor_is_stored_bf16(root: Path, pair) -> None:
    """The copy is rounded to what the write stores anyway; float32 tensors on disk keep a float32 copy."""
    import shutil

    from safetensors.torch import load_file, save_file

    from surgery.refine.heal.memory import snapshot_dtype
    from surgery.refine.heal.pairing import pair as pair_checkpoints

    teacher, student = pair
    assert snapshot_dtype(pair_checkpoints(student, teacher), train_all=True) == torch.float32
    bf16 = {}
    for name, folder in (("student", student), ("teacher", teacher)):
        bf16[name] = root / f"{name}-bf16"
        shutil.copytree(folder, bf16[name], dirs_exist_ok=True)
        for shard in bf16[name].glob("*.safetensors"):
            save_file({n: t.to(torch.bfloat16) for n, t in load_file(shard).items()}, shard, metadata={"format": "pt"})
    for train_all in (True, False):
        assert snapshot_dtype(pair_checkpoints(bf16["student"], bf16["teacher"]), train_all) == torch.bfloat16
