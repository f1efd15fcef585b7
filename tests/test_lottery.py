"""`prune --rounds N --heal-between lottery` (MC-Suite's MoE-Lottery) and the settable heal schedule.

The fine-tune against a plain AdamW loop written out here (cross-entropy, every weight, cosine decay,
a fresh optimizer per round); the rounds' token schedule (doubling) and learning rate as recorded in
pruning.json; --heal-lr and --heal-schedule for the heal stages."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery.cli import main
from surgery.io import Checkpoint
from surgery.architectures import resolve
from surgery.model.data import build_sequences
from surgery.plan import Plan
from surgery.refine.heal.lottery import LotteryOptions, cosine_lr, lottery, round_tokens
from surgery.rewrite.experts import rewrite_checkpoint
from tiny_models import build_tiny, load_model
from tiny_tokenizer import save_tiny_tokenizer
from transformers import AutoTokenizer

WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7 ( ) , ;".split()
SEQ = 24


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lottery")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    rng = random.Random(11)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(120)]
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def pair(root: Path) -> tuple[Path, Path]:
    teacher = build_tiny("qwen3_moe", root / "teacher", layout="fused")
    save_tiny_tokenizer(teacher, vocab_size=128)
    with Checkpoint(teacher) as ckpt:
        layers = resolve(ckpt.config, ckpt.names()).layers
    student = rewrite_checkpoint(teacher, Plan({layer: [0, 3, 4, 6] for layer in layers}), root / "student")
    return teacher, student


def test_schedules() -> None:
    assert [round_tokens(1000, r, "doubling") for r in range(4)] == [1000, 2000, 4000, 8000]
    assert [round_tokens(1000, r, "constant") for r in range(3)] == [1000] * 3
    assert cosine_lr(0, 10, 1e-6) == 1e-6 and cosine_lr(5, 10, 1e-6) == pytest.approx(0.5e-6)
    assert cosine_lr(10, 10, 1e-6) == pytest.approx(0.0, abs=1e-20)


def _by_hand(student: Path, data: Path, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """The paper's fine-tune written out: packed sequences in batches of 8, mean next-token cross-entropy,
    AdamW (no weight decay), lr cosine to 0 over the steps, gradient norm clipped to 1."""
    model = load_model(student)
    model.train()
    ids = build_sequences([str(data)], AutoTokenizer.from_pretrained(student), steps * 8, SEQ, 0).input_ids
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = ids[step * 8:(step + 1) * 8]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return {n: p.detach() for n, p in model.state_dict().items()}


def test_lottery_matches_a_plain_adamw_loop(pair: tuple[Path, Path], data: Path, root: Path) -> None:
    teacher, student = pair
    out = root / "lottery"
    record = lottery(student, teacher, [str(data)], out, LotteryOptions(tokens=3 * 8 * SEQ, lr=1e-3, seq_len=SEQ,
                                                                        device="cpu", progress=False))
    stage = record["stages"][0]
    assert stage["steps"] == 3 and stage["tokens"] == 3 * 8 * SEQ and stage["lr"] == 1e-3 and stage["train"] == "all"
    expected = _by_hand(student, data, 3, 1e-3)
    ours = load_model(out).state_dict()
    before = load_model(student).state_dict()
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=name)
        changed += not torch.equal(ours[name], before[name])
    assert changed > len(expected) // 2  # every weight trains, not just the experts
    doc = json.loads((out / "pruning.json").read_text())
    assert doc["heal"]["recipe"] == "moe-lottery" and doc["expert_map"]
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_rounds_with_lottery_double_the_tokens(pair: tuple[Path, Path], data: Path, root: Path) -> None:
    teacher, _ = pair
    out = root / "rounds-lottery"
    result = CliRunner().invoke(main, ["prune", str(teacher), "-d", str(data), "--criterion", "frequency", "--keep", "4",
                                       "--rounds", "2", "--heal-between", "lottery", "--heal-tokens", str(8 * SEQ),
                                       "--heal-lr", "1e-4", "--samples", "4", "--seq-len", str(SEQ), "--holdout", "0",
                                       "--device", "cpu", "--dtype", "float32", "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    heals = json.loads((out / "pruning.json").read_text())["heal"]
    assert [h["stages"][0]["steps"] for h in heals] == [1, 2]  # 0.2M-style doubling: 8*SEQ, then 16*SEQ tokens
    assert all(h["recipe"] == "moe-lottery" and h["stages"][0]["lr"] == 1e-4 for h in heals)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert load_file(str(next(out.glob("*.safetensors"))))  # loads


def test_heal_lr_and_schedule_reach_the_heal_stages(pair: tuple[Path, Path], data: Path, root: Path) -> None:
    teacher, _ = pair
    out = root / "rounds-local"
    result = CliRunner().invoke(main, ["prune", str(teacher), "-d", str(data), "--criterion", "frequency", "--keep", "4",
                                       "--rounds", "2", "--heal-between", "local", "--heal-tokens", str(16 * SEQ),
                                       "--heal-lr", "1e-3", "--heal-schedule", "doubling", "--samples", "4",
                                       "--seq-len", str(SEQ), "--holdout", "0", "--batch-size", "4", "--device", "cpu",
                                       "--dtype", "float32", "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    heals = json.loads((out / "pruning.json").read_text())["heal"]
    assert [h["stages"][0]["lr"] for h in heals] == [1e-3, 1e-3]
    assert [h["tokens"] for h in heals] == [16 * SEQ, 32 * SEQ]  # held-out share included


def test_heal_options_need_rounds(pair: tuple[Path, Path], data: Path, root: Path) -> None:
    teacher, _ = pair
    result = CliRunner().invoke(main, ["prune", str(teacher), "-d", str(data), "--criterion", "frequency", "--keep", "4",
                                       "--heal-between", "lottery", "-o", str(root / "no")])
    assert result.exit_code == 2 and "--rounds" in result.output and not (root / "no").exists()
