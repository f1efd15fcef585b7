"""`moe-surgery heal`: each stage lowers its own error on held-out data, trained tensors go back into the
student's exact layout (everything else byte-identical), sparsity masks survive, bad pairs are refused."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.architectures import get_spec, resolve
from surgery.cli import main
from surgery.model.blocks import find_blocks
from surgery.eval.perplexity import evaluate
from surgery.model.load import load_tokenizer
from surgery.refine.heal.export import disk_tensors
from surgery.refine.heal.run import HealOptions, heal
from surgery.io import Checkpoint
from surgery.plan import Plan
from surgery.rewrite.experts import rewrite_checkpoint
from surgery.refine.sparsify import check_nm, sparsify_checkpoint
from tiny_models import ARCHS, LAYOUTS, build_tiny, checkpoint_bytes, folder_digest, load_model
from tiny_tokenizer import save_tiny_tokenizer

WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7 ( ) , ;".split()
KEEP = [0, 3, 4, 6]  # 4 of 8 experts, two per half: valid for group-limited routers too
FAST = dict(tokens=24 * 16, seq_len=24, batch_size=4, local_tokens=24 * 16, device="cpu", progress=False)


def _docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heal")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return _jsonl(root / "calib.jsonl", _docs(11, 120))


@pytest.fixture(scope="module")
def eval_file(root: Path) -> Path:
    return _jsonl(root / "eval.jsonl", _docs(99, 40))


def _teacher(root: Path, model_type: str, layout: str) -> Path:
    path = root / f"teacher-{model_type}-{layout}"
    if not path.exists():
        build_tiny(model_type, path, layout=layout)
        save_tiny_tokenizer(path, vocab_size=128)
    return path


def _student(root: Path, teacher: Path, name: str = "student") -> Path:
    out = teacher.parent / f"{teacher.name}-{name}"
    if not out.exists():
        layers = resolve(Checkpoint(teacher).config, Checkpoint(teacher).names()).layers
        rewrite_checkpoint(teacher, Plan({layer: KEEP for layer in layers}), out)
    return out


@pytest.fixture(scope="module")
def pair_fused(root: Path) -> tuple[Path, Path]:
    teacher = _teacher(root, "qwen3_moe", "fused")
    return teacher, _student(root, teacher)


@pytest.fixture(scope="module")
def local_healed(root: Path, pair_fused: tuple[Path, Path], data: Path) -> tuple[Path, dict]:
    teacher, student = pair_fused
    out = root / "healed-local"
    record = heal(student, teacher, [str(data)], out, HealOptions(local_steps=40, kd_steps=0, local_inputs="teacher", **FAST))
    return out, record


def _block_error(model_dir: Path, teacher_dir: Path, ids: torch.Tensor) -> dict[int, float]:
    """Per MoE layer: ||student block(x) - teacher block(x)||^2 / ||teacher block(x)||^2 on the teacher's block inputs."""
    spec = get_spec("qwen3_moe")
    teacher, student = load_model(teacher_dir), load_model(model_dir)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for b in find_blocks(teacher, spec):
        def hook(module, args, output, layer=b.layer):
            seen[layer] = (args[0], output[0] if isinstance(output, tuple) else output)
        handles.append(teacher.get_submodule(b.name).register_forward_hook(hook))
    with torch.no_grad():
        teacher(input_ids=ids)
        errors = {}
        for b in find_blocks(student, spec):
            x, y = seen[b.layer]
            ours = student.get_submodule(b.name)(x)
            ours = ours[0] if isinstance(ours, tuple) else ours
            errors[b.layer] = float(((ours - y) ** 2).sum() / (y**2).sum())
    for h in handles:
        h.remove()
    return errors


# ---------------------------------------------------------------------------------------------
# Stages


def test_local_stage_lowers_block_error_on_held_out_text(local_healed, pair_fused, eval_file: Path) -> None:
    out, record = local_healed
    teacher, student = pair_fused
    stage = record["stages"][0]
    assert stage["stage"] == "local" and len(record["stages"]) == 1
    assert all(v["held_out_error_after"] < v["held_out_error_before"] for v in stage["layers"].values()), stage
    ids = torch.tensor([load_tokenizer(teacher)(" ".join(_docs(5, 10)))["input_ids"][:96]])
    before, after = _block_error(student, teacher, ids), _block_error(out, teacher, ids)
    assert set(before) == {int(k) for k in stage["layers"]}
    assert all(after[layer] < before[layer] for layer in before), (before, after)


@pytest.mark.parametrize("inputs", ["student", "both"])
def test_sequential_local_stage_brings_logits_closer(root: Path, pair_fused, data: Path, eval_file: Path,
                                                     inputs: str) -> None:
    teacher, student = pair_fused
    out = root / f"healed-sequential-{inputs}"
    heal(student, teacher, [str(data)], out, HealOptions(local_steps=40, kd_steps=0, local_inputs=inputs, **FAST))
    tok = load_tokenizer(teacher)
    ref = load_model(teacher)
    kl = [evaluate(load_model(m), tok, [str(eval_file)], seq_len=24, max_tokens=480, reference=ref,
                   progress=False)["kl"] for m in (student, out)]
    assert kl[1] < kl[0], kl


def test_distillation_lowers_held_out_kl(root: Path, pair_fused, data: Path, eval_file: Path) -> None:
    teacher, student = pair_fused
    out = root / "healed-kd"
    record = heal(student, teacher, [str(data)], out, HealOptions(local_steps=0, kd_steps=15, lr=3e-3, **FAST))
    stage = record["stages"][0]
    assert stage["stage"] == "distill" and stage["steps"] == 15
    assert stage["held_out_kl_after"] < stage["held_out_kl_before"], stage
    tok = load_tokenizer(teacher)
    ref = load_model(teacher)
    kl = [evaluate(load_model(m), tok, [str(eval_file)], seq_len=24, max_tokens=480, reference=ref,
                   progress=False)["kl"] for m in (student, out)]
    assert kl[1] < kl[0], kl


@pytest.mark.parametrize("inputs", ["student", "teacher"])
def test_half_precision_layers_heal(root: Path, pair_fused, data: Path, inputs: str) -> None:
    """bfloat16 streamed layers and teacher (the GPU default) with float32 training: both stages run, and
    neither ends worse on its held-out tokens than where it started."""
    teacher, student = pair_fused
    record = heal(student, teacher, [str(data)], root / f"healed-bf16-{inputs}",
                  HealOptions(local_steps=10, kd_steps=3, local_inputs=inputs, dtype="bfloat16", **FAST))
    local, kd = record["stages"]
    assert all(v["held_out_error_after"] <= v["held_out_error_before"] for v in local["layers"].values())
    assert kd["held_out_kl_after"] <= kd["held_out_kl_before"]


def test_defaults_read_all_the_text_and_distil_on_kd_tokens(root: Path, pair_fused, data: Path) -> None:
    """Without --tokens every sequence the text holds is used (no error for text shorter than the 8M
    default); the distillation runs ceil(kd_tokens / (batch * seq_len)) steps, cycling through them."""
    teacher, student = pair_fused
    fast = {k: v for k, v in FAST.items() if k != "tokens"}
    record = heal(student, teacher, [str(data)], root / "healed-defaults",
                  HealOptions(local_steps=0, kd_tokens=24 * 4 * 120, lr=3e-3, **fast))
    tok = load_tokenizer(teacher)
    available = sum(len(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]) + 1
                    for line in data.read_text().splitlines())
    assert available // 24 - 1 <= record["tokens"] // 24 <= available // 24
    stage = record["stages"][0]
    assert stage["steps"] == 120 and stage["tokens"] == 120 * 4 * 24
    assert stage["tokens"] > record["tokens"] - record["held_out_tokens"]  # more than one pass
    # the kept state is the best of the held-out checks (or the start), never a later, worse one
    assert stage["held_out_kl_after"] == min([stage["held_out_kl_before"], *(k for _, k in stage["held_out_kl_checks"])])
    assert len(stage["held_out_kl_checks"]) == 10


# ---------------------------------------------------------------------------------------------
# Output


def test_only_trained_tensors_change(local_healed, pair_fused) -> None:
    out, record = local_healed
    _, student = pair_fused
    written = set(record["tensors_written"])
    assert written == set(json.loads((out / "pruning.json").read_text())["heal"]["tensors_written"])
    before, after = checkpoint_bytes(student), checkpoint_bytes(out)
    assert before.keys() == after.keys()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in student.glob("*.safetensors"))
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((student / "model.safetensors.index.json").read_text())
    for name, (dtype, shape, raw) in before.items():
        assert after[name][:2] == (dtype, shape), name
        if name in written:
            assert re.search(r"\.mlp\.(gate\.weight|experts\.)", name), name
        else:
            assert after[name][2] == raw, f"{name} changed but was not trained"
    assert any(after[n][2] != before[n][2] for n in written)


def test_healed_checkpoint_loads_verifies_and_records(local_healed, pair_fused, data: Path) -> None:
    out, _ = local_healed
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "pruning.json").read_text())
    student_doc = json.loads((pair_fused[1] / "pruning.json").read_text())
    assert doc["expert_map"] == student_doc["expert_map"]
    heal_record = doc["heal"]
    assert heal_record["data"][0]["path"] == str(data) and len(heal_record["data"][0]["sha256"]) == 64
    assert heal_record["stages"][0]["layers"] and heal_record["tokens"] == 24 * 16
    model = load_model(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits).all()


def _round_trip(model_dir: Path) -> None:
    """disk_tensors(in-memory parameters) reproduces the on-disk bytes of router and expert tensors."""
    ckpt = Checkpoint(model_dir)
    layout = resolve(ckpt.config, ckpt.names())
    model = load_model(model_dir)
    spec = layout.spec
    params = {}
    for b in find_blocks(model, spec):
        block = model.get_submodule(b.name)
        params.update({f"{b.name}.{n}": p.detach() for n, p in block.named_parameters()
                       if n.startswith((f"{spec.router_module}.", "experts."))})
    values = disk_tensors(ckpt, layout, params)
    expected = {n for e in layout.layers.values() for n in [*e.fused, *(x for xs in e.per_expert.values() for x in xs)]}
    expected |= {n for e in layout.layers.values() for n in e.router if n in values or "bias" not in n}
    assert expected <= set(values), sorted(expected - set(values))
    for name, value in values.items():
        disk = torch.from_numpy(ckpt.array(name).copy())
        assert torch.equal(value.to(disk.dtype), disk), name
    ckpt.close()


@pytest.mark.parametrize("model_type,layout", [(mt, lay) for mt in ARCHS for lay in LAYOUTS[mt]
                                               if get_spec(mt).expert_math in ("glu_halves", "gpt_oss")])
def test_trained_parameters_map_back_to_the_exact_on_disk_tensors(root: Path, model_type: str, layout: str) -> None:
    _round_trip(_teacher(root, model_type, layout))


# ---------------------------------------------------------------------------------------------
# Sparsified students


def test_sparsified_student_keeps_its_zeros(root: Path, pair_fused, data: Path) -> None:
    teacher, _ = pair_fused
    sparse = root / "sparse-2-4"
    sparsify_checkpoint(teacher, None, sparse, sparsity=None, pattern="2:4", method="magnitude")
    out = root / "sparse-healed"
    record = heal(sparse, teacher, [str(data)], out, HealOptions(local_steps=10, kd_steps=4, lr=3e-3, **FAST))
    assert [s["stage"] for s in record["stages"]] == ["local", "distill"]
    assert record["stages"][1]["expert_wise_loss"] is True
    assert check_nm(out) == []
    before, after = checkpoint_bytes(sparse), checkpoint_bytes(out)
    changed = 0
    for name in record["tensors_written"]:
        dtype, shape, raw = before[name]
        a = np.frombuffer(raw, np.float32)
        b = np.frombuffer(after[name][2], np.float32)
        if ".experts." in name:
            assert np.array_equal(a == 0, b == 0), f"{name}: zero pattern changed"
        changed += int(not np.array_equal(a, b))
    assert changed


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _refused(args: list, out: Path, problem: str, name: str) -> None:
    result = CliRunner().invoke(main, ["heal", *map(str, args), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert name in lines[0] and re.search(problem, lines[0], re.IGNORECASE), lines[0]
    assert not out.exists() or out.name == "exists"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_refuses_a_teacher_of_another_shape(root: Path, pair_fused, data: Path) -> None:
    _, student = pair_fused
    other = _teacher(root, "mixtral", "per-expert")
    before = folder_digest(student)
    _refused([student, "--teacher", other, "-d", data], root / "bad1", "model_type|hidden_size|teacher", "config.json")
    assert folder_digest(student) == before


def test_refuses_a_look_alike_teacher(root: Path, pair_fused, data: Path) -> None:
    """Same architecture and shapes, other weights: the student's router rows give it away."""
    _, student = pair_fused
    other = root / "look-alike"
    if not other.exists():
        build_tiny("qwen3_moe", other, layout="fused", seed=1)
        save_tiny_tokenizer(other, vocab_size=128)
    _refused([student, "--teacher", other, "-d", data], root / "bad6", "pruned from", "look-alike")


def test_refuses_a_student_without_pruning_json(root: Path, pair_fused, data: Path) -> None:
    teacher, _ = pair_fused
    _refused([teacher, "--teacher", teacher, "-d", data], root / "bad2", "pruning.json", "pruning.json")


def test_refuses_kept_ids_out_of_range(root: Path, pair_fused, data: Path) -> None:
    teacher, student = pair_fused
    copy = root / "student-bad-ids"
    shutil.copytree(student, copy)
    doc = json.loads((copy / "pruning.json").read_text())
    first = next(iter(doc["expert_map"]))
    doc["expert_map"][first] = [0, 3, 4, 99]
    (copy / "pruning.json").write_text(json.dumps(doc))
    _refused([copy, "--teacher", teacher, "-d", data], root / "bad3", "out of range", "pruning.json")


def test_refuses_too_little_data(root: Path, pair_fused, data: Path) -> None:
    teacher, student = pair_fused
    _refused([student, "--teacher", teacher, "-d", data, "--tokens", "10000000", "--seq-len", "24"],
             root / "bad4", "tokens", "calib.jsonl")


def test_refuses_text_shorter_than_two_sequences_by_default(root: Path, pair_fused) -> None:
    teacher, student = pair_fused
    short = _jsonl(root / "short.jsonl", _docs(3, 2))
    tokens = sum(len(load_tokenizer(teacher)(d, add_special_tokens=False)["input_ids"]) + 1 for d in _docs(3, 2))
    seq_len = tokens * 2 // 3  # one sequence fits, two do not
    _refused([student, "--teacher", teacher, "-d", short, "--seq-len", seq_len], root / "bad-short",
             f"needs at least {2 * seq_len}", "short.jsonl")


def test_refuses_an_existing_output_folder(root: Path, pair_fused, data: Path) -> None:
    teacher, student = pair_fused
    out = root / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused([student, "--teacher", teacher, "-d", data], out, "exists", "exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_refuses_a_quantized_student(root: Path, pair_fused, data: Path) -> None:
    teacher, student = pair_fused
    copy = root / "student-fp8"
    shutil.copytree(student, copy)
    for shard in copy.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {n: t.to(torch.float8_e4m3fn) if ".experts." in n else t for n, t in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    _refused([copy, "--teacher", teacher, "-d", data], root / "bad5", "quantized", "safetensors")


# ---------------------------------------------------------------------------------------------
# prune --rounds N --heal-between: estimate → prune → heal


def test_rounds_with_heal_between_equal_the_steps_by_hand(root: Path, data: Path) -> None:
    from surgery.pipeline.score import ScoreOptions, score_plan
    from surgery.collect.run import collect

    teacher = _teacher(root, "qwen3_moe", "per-expert")
    out = root / "rounds-healed"
    run = dict(samples=4, seq_len=24, holdout=0, batch_size=4, seed=3)
    result = CliRunner().invoke(main, ["prune", str(teacher), "-d", str(data), "--criterion", "frequency", "--keep", "4",
                                       "--rounds", "2", "--heal-between", "local", "--heal-tokens", "384",
                                       *[f"--{k.replace('_', '-')}={v}" for k, v in run.items()],
                                       "--device", "cpu", "--dtype", "float32", "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)

    current, composed = teacher, None
    for r, count in enumerate([6, 4]):
        stats = root / f"by-hand-{r}.safetensors"
        collect(current, [str(data)], stats, device="cpu", dtype="float32", progress=False, **run)
        step = score_plan(current, stats, ScoreOptions("frequency", keep=count, seed=3)).keep_lists()
        composed = step if composed is None else {k: [composed[k][i] for i in ids] for k, ids in step.items()}
        pruned = rewrite_checkpoint(current, Plan(step), root / f"by-hand-pruned-{r}")
        healed = root / f"by-hand-healed-{r}"
        heal(pruned, current, [str(data)], healed, HealOptions(tokens=384, seq_len=24, batch_size=4, device="cpu", seed=3,
                                                             kd_steps=0, synthesize=False, progress=False))
        current = healed
    ours, theirs = checkpoint_bytes(out), checkpoint_bytes(current)
    assert ours == theirs
    doc = json.loads((out / "pruning.json").read_text())
    assert doc["expert_map"] == {str(k): v for k, v in sorted(composed.items())}
    assert doc["num_experts_before"] == 8 and doc["source"]["path"] == str(teacher.resolve())
    assert len(doc["heal"]) == 2 and all(h["stages"][0]["stage"] == "local" for h in doc["heal"])
    assert [r["keep_per_layer"] for r in doc["plan"]["rounds"]] == [6, 4]
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


# ---------------------------------------------------------------------------------------------
# Teacher samples when the local stage is short of text

def test_teacher_samples_continue_real_prefixes(pair_fused) -> None:
    from surgery.refine.heal.synthetic import prompts, teacher_samples

    teacher, _ = pair_fused
    real = torch.randint(3, 100, (5, 40), generator=torch.Generator().manual_seed(0))
    starts = prompts(real, 12, prefix=8)
    assert starts.shape == (12, 8) and torch.equal(starts[0], real[0, :8]) and torch.equal(starts[7], real[2, 5:13])  # pass 1: offset 997 mod 32
    model = load_model(teacher)
    first = teacher_samples(model, real, 12, seed=1, device=torch.device("cpu"), progress=False)
    assert first.shape == (12, 40)  # full length: the end of text is never sampled early
    assert torch.equal(first[:, :32], prompts(real, 12, prefix=32))  # each sample starts with real text
    assert torch.equal(first, teacher_samples(model, real, 12, seed=1, device=torch.device("cpu"), progress=False))
    assert not torch.equal(first, teacher_samples(model, real, 12, seed=2, device=torch.device("cpu"), progress=False))


def test_short_text_is_topped_up_with_teacher_samples(root: Path, pair_fused, data: Path) -> None:
    """15 training sequences and --local-tokens for 64: 3 samples per real sequence (45); none without synthesize."""
    teacher, student = pair_fused
    fast = {**FAST, "local_tokens": 24 * 64}
    on = heal(student, teacher, [str(data)], root / "healed-sampled", HealOptions(local_steps=5, kd_steps=0, **fast))
    off = heal(student, teacher, [str(data)], root / "healed-unsampled",
               HealOptions(local_steps=5, kd_steps=0, synthesize=False, **fast))
    local_on, local_off = on["stages"][0], off["stages"][0]
    assert local_on["teacher_samples"]["sequences"] == 45 and local_on["teacher_samples"]["tokens"] == 45 * 24
    assert local_on["tokens"] == 60 * 24 and local_off["tokens"] == 15 * 24 and "teacher_samples" not in local_off
    assert on["held_out_tokens"] == off["held_out_tokens"] == 24  # held out stays real text
    assert CliRunner().invoke(main, ["verify", str(root / "healed-sampled")]).exit_code == 0
