"""`heal` on quantized students (FP8 block / channel / tensor, NVFP4, MXFP4): trained from the dequantized weights,
written back in the student's own scheme with fresh scales (same names, dtypes, shapes; untrained tensors byte for
byte; the recorded re-quantization error is the real one and within the scheme's rounding bound), or with
--output-dtype bf16 as unquantized tensors that loaders accept. Bad scales are refused before any training."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import surgery.refine.heal.local as local_module
from surgery.architectures import resolve
from surgery.cli import main
from surgery.io import Checkpoint
from surgery.model.load import load_model
from surgery.plan import Plan
from surgery.refine.heal.export import disk_tensors
from surgery.refine.heal.run import HealOptions, heal
from surgery.rewrite.experts import rewrite_checkpoint
from quantized_models import BUILDERS, reference_dequantized
from tiny_models import INDEX_NAME, checkpoint_bytes
from tiny_tokenizer import save_tiny_tokenizer

WORDS = "expert router token layer model prune gate weight sparse dense mixture of the a and 42 7".split()
FAST = dict(tokens=24 * 16, seq_len=24, batch_size=4, local_tokens=24 * 16, device="cpu", progress=False)
KEEP = [0, 3, 4, 6]
# Relative rounding error of one value, half a code step at worst: e4m3 (3 mantissa bits) 2^-4; e2m1 1/3 (0.75 -> 0.5).
BOUND = {"deepseek_fp8": 2**-4, "qwen3_fp8": 2**-4, "qwen3_fp8_fused": 2**-4, "glm_ct_fp8": 2**-4,
         "glm_ct_fp8_tensor": 2**-4, "gpt_oss_mxfp4": 1 / 3, "qwen3_nvfp4": 1 / 3}
SCALE = re.compile(r"(_scale_inv|\.weight_scale|\.weight_global_scale|_scales)$")
TRANSFORMERS_CPU = ("qwen3_fp8", "gpt_oss_mxfp4")  # the schemes transformers loads on a CPU without extra packages


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heal-quantized")
    rng = random.Random(5)
    (root / "calib.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))}) + "\n" for _ in range(80)))
    return root


def _pair(root: Path, scheme: str) -> tuple[Path, Path]:
    """(teacher, student): the quantized tiny model and its copy pruned to 4 of 8 experts per MoE layer."""
    teacher, student = root / scheme, root / f"{scheme}-student"
    if not student.exists():
        BUILDERS[scheme](teacher)
        save_tiny_tokenizer(teacher, vocab_size=128)
        ckpt = Checkpoint(teacher)
        layers = resolve(ckpt.config, ckpt.names()).layers
        ckpt.close()
        rewrite_checkpoint(teacher, Plan({layer: KEEP for layer in layers}), student)
    return teacher, student


def _heal(root: Path, scheme: str, monkeypatch, output_dtype: str | None = None) -> tuple[Path, dict, dict]:
    """Heal (2 local steps a layer, no distillation); returns (output, record, the trained values as trained)."""
    teacher, student = _pair(root, scheme)
    trained: dict[str, torch.Tensor] = {}
    fit = local_module._fit

    def capture(*args, **kwargs):
        result = fit(*args, **kwargs)
        trained.update({n: v.clone() for n, v in kwargs["params_out"].items()})
        return result

    monkeypatch.setattr(local_module, "_fit", capture)
    out = root / f"{scheme}-healed-{output_dtype}"
    record = heal(student, teacher, [str(root / "calib.jsonl")], out,
                  HealOptions(local_steps=2, kd_steps=0, output_dtype=output_dtype, overwrite=True, **FAST))
    return out, record, trained


def _plain_values(student: Path, trained: dict) -> dict[str, torch.Tensor]:
    """The trained values under their plain on-disk names, in the unquantized on-disk layout."""
    ckpt = Checkpoint(student)
    values = disk_tensors(ckpt, resolve(ckpt.config, ckpt.names()), trained)
    ckpt.close()
    return values


def _verify_and_load(out: Path) -> torch.nn.Module:
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(out, "cpu", torch.float32)
    assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits).all()
    return model


def _same_as_transformers(out: Path, ours: torch.nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs[name].float(), value), name


@pytest.mark.parametrize("scheme", sorted(BUILDERS))
def test_heal_writes_the_students_own_scheme(root: Path, scheme: str, monkeypatch) -> None:
    out, record, trained = _heal(root, scheme, monkeypatch)
    student = _pair(root, scheme)[1]
    before, after = checkpoint_bytes(student), checkpoint_bytes(out)
    assert {n: v[:2] for n, v in after.items()} == {n: v[:2] for n, v in before.items()}
    written = set(record["tensors_written"])
    assert any(SCALE.search(n) for n in written) and not any("input_" in n for n in written)
    for name, (_, _, raw) in after.items():
        if name not in written:
            assert raw == before[name][2], f"{name} changed but was not trained"
    # the recorded error is the real one: the written codes, dequantized independently, against the trained values
    reference = reference_dequantized(out)
    errors = [float((reference[n] - v).norm() / v.norm()) for n, v in _plain_values(student, trained).items()
              if after.get(n, ("F8_E4M3",))[0] not in ("BF16", "F32")]
    q = record["requantization"]
    assert q["tensors"] == len(errors) > 0
    assert q["relative_error_max"] == pytest.approx(max(errors), rel=1e-4)
    assert q["relative_error_mean"] == pytest.approx(float(np.mean(errors)), rel=1e-4)
    assert 0 < q["relative_error_max"] < BOUND[scheme]
    assert json.loads((out / "pruning.json").read_text())["heal"]["requantization"] == q
    assert json.loads((out / "config.json").read_text()) == json.loads((student / "config.json").read_text())
    model = _verify_and_load(out)
    if scheme in TRANSFORMERS_CPU:
        _same_as_transformers(out, model)


@pytest.mark.parametrize("scheme", ["deepseek_fp8", "glm_ct_fp8", "gpt_oss_mxfp4", "qwen3_fp8", "qwen3_nvfp4"])
def test_output_dtype_bf16_writes_trained_weights_unquantized(root: Path, scheme: str, monkeypatch) -> None:
    out, record, trained = _heal(root, scheme, monkeypatch, output_dtype="bf16")
    student = _pair(root, scheme)[1]
    before, after = checkpoint_bytes(student), checkpoint_bytes(out)
    plain = _plain_values(student, trained)
    quantized = [n for n in plain if n not in before or before[n][0] not in ("BF16", "F32")]
    assert quantized and "requantization" not in record
    for name in quantized:
        dtype, shape, raw = after[name]
        assert dtype == "BF16" and shape == list(plain[name].shape)
        assert raw == plain[name].to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes(), name
        assert not [n for n in after if n != name and n.startswith(name) and SCALE.search(n)], name
        assert not [n for n in after if n.startswith(name.removesuffix(".weight") + ".input_")], name
    for name, (dtype, shape, raw) in after.items():
        if name not in record["tensors_written"]:
            assert (dtype, shape, raw) == tuple(before[name]), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    listed = qc.get("ignore") if qc["quant_method"] == "compressed-tensors" else qc["modules_to_not_convert"]
    assert set(record["unquantized_modules"]) <= set(listed)
    assert all(any(n.startswith(m) for m in listed) for n in quantized)
    model = _verify_and_load(out)
    if scheme in TRANSFORMERS_CPU:
        _same_as_transformers(out, model)


def _edited(student: Path, out: Path, edit) -> Path:
    """A copy of `student` with edit(tensors) applied to the shard holding layer-0/1 expert 0's first scale."""
    import shutil

    shutil.copytree(student, out)
    index = json.loads((out / INDEX_NAME).read_text())
    target = next(n for n in sorted(index["weight_map"]) if SCALE.search(n) and ".experts." in n)
    shard = out / index["weight_map"][target]
    tensors = edit(load_file(shard), target)
    shard.unlink()
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if n != target or n in tensors}
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("scheme,problem", [("qwen3_fp8", "missing"), ("qwen3_nvfp4", "missing"),
                                            ("gpt_oss_mxfp4", "missing"), ("qwen3_fp8", "shape"),
                                            ("qwen3_nvfp4", "shape"), ("gpt_oss_mxfp4", "shape")])
def test_refuses_bad_scales_before_training(root: Path, scheme: str, problem: str) -> None:
    teacher, student = _pair(root, scheme)

    def edit(tensors: dict, target: str) -> dict:
        if problem == "missing":
            return {n: t for n, t in tensors.items() if n != target}
        return {**tensors, target: tensors[target].reshape(-1)[:-1].clone()}

    bad = _edited(student, root / f"{scheme}-bad-{problem}", edit)
    out = root / f"{scheme}-bad-{problem}-out"
    result = CliRunner().invoke(main, ["heal", str(bad), "--teacher", str(teacher), "-d", str(root / "calib.jsonl"),
                                       "-o", str(out), "--device", "cpu", "--local-steps", "2", "--kd-steps", "0"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search("companion" if problem == "missing" else "shape", lines[0]), result.output
    assert ".safetensors" in lines[0]
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(f".{out.name}.")]
