"""A pruned checkpoint computes what the original computes with the dropped experts masked in
its routers, for every supported architecture and on-disk layout (through the CLI)."""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import Result
from transformers import AutoModelForCausalLM

from tiny_models import (
    ARCHS, INDEX_NAME, LAYOUTS, NUM_EXPERTS, add_fake_mtp_layer, build_tiny, checkpoint_bytes, load_model,
    masked_logits, moe_layers, read_header, take_bytes,
)

CASES = [pytest.param(mt, layout, id=f"{mt}-{layout}") for mt in ARCHS for layout in LAYOUTS[mt]]
# Every spelling of the routed-expert count seen in configs (transformers attribute_map aliases).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
OTHER_FILES = ("generation_config.json", "tokenizer_config.json")  # README.md becomes the model card (test_hub)
TOL = 1e-5
MIN_EFFECT = 1e-3


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1234))


def uniform_plan(model_dir: Path, seed: int) -> dict[int, list[int]]:
    """Drop 2-4 experts in every MoE layer (same count everywhere, same count in every router group)."""
    config = json.loads((model_dir / "config.json").read_text())
    n_group = int(config.get("n_group") or 1)
    size = NUM_EXPERTS // n_group
    rng = random.Random(seed)
    per_group = rng.choice([d for d in range(1, size - 1) if 2 <= d * n_group <= 4])
    keep = {}
    for layer in moe_layers(model_dir):
        dropped = {g * size + i for g in range(n_group) for i in rng.sample(range(size), per_group)}
        keep[layer] = [e for e in range(NUM_EXPERTS) if e not in dropped]
    return keep


def write_plan(path: Path, keep: dict[int, list[int]]) -> Path:
    path.write_text(json.dumps({"keep": {str(layer): ids for layer, ids in keep.items()}}))
    return path


@dataclass
class Pruned:
    src: Path
    out: Path
    keep: dict[int, list[int]]
    result: Result

    @property
    def drop(self) -> dict[int, list[int]]:
        return {layer: sorted(set(range(NUM_EXPERTS)) - set(ids)) for layer, ids in self.keep.items()}

    @property
    def new_count(self) -> int:
        (count,) = {len(ids) for ids in self.keep.values()}
        return count


@pytest.fixture(scope="module")
def pruned(tiny: Callable[[str, str], Path], cli: Callable[..., Result],
           tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Pruned]:
    """`pruned(model_type, layout)`: the tiny model pruned once through `moe-surgery prune`."""
    root = tmp_path_factory.mktemp("pruned")
    cache: dict[tuple[str, str], Pruned] = {}

    def get(model_type: str, layout: str) -> Pruned:
        name = f"{model_type}-{layout}"
        if (model_type, layout) not in cache:
            src = tiny(model_type, layout)
            keep = uniform_plan(src, zlib.crc32(name.encode()))
            out = root / name
            result = cli("prune", src, "--plan", write_plan(root / f"{name}.plan.json", keep), "-o", out)
            cache[model_type, layout] = Pruned(src, out, keep, result)
        p = cache[model_type, layout]
        assert p.result.exit_code == 0, f"prune failed: {p.result.output}{p.result.exception!r}"
        return p

    return get


@pytest.mark.parametrize("model_type,layout", CASES)
def test_logits_match_masked_original(model_type: str, layout: str, pruned: Callable[[str, str], Pruned]) -> None:
    p = pruned(model_type, layout)
    ids = input_ids()
    model, info = AutoModelForCausalLM.from_pretrained(p.out, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        got = model.eval()(ids).logits
    want = masked_logits(p.src, p.drop, ids)
    unmasked = masked_logits(p.src, {}, ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= TOL
    assert (got - unmasked).abs().max().item() > MIN_EFFECT, "dropping experts must change the output"


@pytest.mark.parametrize("model_type,layout", CASES)
def test_verify_passes(model_type: str, layout: str, pruned: Callable[[str, str], Pruned],
                       cli: Callable[..., Result]) -> None:
    result = cli("verify", pruned(model_type, layout).out)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("model_type,layout", CASES)
def test_index_matches_shards(model_type: str, layout: str, pruned: Callable[[str, str], Pruned]) -> None:
    out = pruned(model_type, layout).out
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(f.name for f in out.glob("*.safetensors"))
    total, names = 0, {}
    for shard in shards:
        header, _ = read_header(out / shard)
        names.update({n: shard for n in header})
        total += sum(e - b for b, e in (entry["data_offsets"] for entry in header.values()))
    assert index["weight_map"] == names
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("model_type,layout", CASES)
def test_config_expert_count_updated(model_type: str, layout: str, pruned: Callable[[str, str], Pruned]) -> None:
    p = pruned(model_type, layout)
    before = json.loads((p.src / "config.json").read_text())
    after = json.loads((p.out / "config.json").read_text())
    present = [k for k in EXPERT_COUNT_KEYS if k in before]
    assert present and all(before[k] == NUM_EXPERTS for k in present)
    assert after == {**before, **{k: p.new_count for k in present}}


@pytest.mark.parametrize("model_type,layout", CASES)
def test_other_files_copied(model_type: str, layout: str, pruned: Callable[[str, str], Pruned]) -> None:
    p = pruned(model_type, layout)
    for name in OTHER_FILES:
        assert (p.out / name).read_bytes() == (p.src / name).read_bytes(), name


@pytest.mark.parametrize("model_type,layout", CASES)
def test_pruning_json_maps_new_to_original(model_type: str, layout: str, pruned: Callable[[str, str], Pruned]) -> None:
    p = pruned(model_type, layout)
    info = json.loads((p.out / "pruning.json").read_text())
    assert info["num_experts_before"] == NUM_EXPERTS
    assert info["num_experts_after"] == p.new_count
    assert info["expert_map"] == {str(layer): ids for layer, ids in p.keep.items()}


@pytest.mark.parametrize("layout", LAYOUTS["deepseek_v3"])
@pytest.mark.parametrize("name_mtp", [False, True], ids=["mtp-from-last-layer", "mtp-in-plan"])
def test_deepseek_v3_mtp_layer(layout: str, name_mtp: bool, tmp_path: Path, cli: Callable[..., Result]) -> None:
    """The MTP layer (index num_hidden_layers) is pruned to the same expert count as the main layers."""
    src = build_tiny("deepseek_v3", tmp_path / "src", layout=layout)
    mtp = add_fake_mtp_layer(src)
    keep = uniform_plan(src, seed=7)
    main_keep = dict(keep)
    if name_mtp:
        keep[mtp] = [0, 1, 4, 5] if len(keep[max(keep)]) == 4 else [0, 1, 3, 4, 5, 7]
        assert keep[mtp] != keep[max(main_keep)]
    expected = keep.get(mtp, keep[max(keep)])
    out = tmp_path / "out"
    result = cli("prune", src, "--plan", write_plan(tmp_path / "plan.json", keep), "-o", out)
    assert result.exit_code == 0, result.output
    assert cli("verify", out).exit_code == 0

    n = len(expected)
    assert n == len(main_keep[max(main_keep)])
    prefix = f"model.layers.{mtp}.mlp."
    expert_re = re.compile(re.escape(prefix) + r"experts\.(\d+)\.(.+)$")
    routed = ("gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj")
    sliced = {prefix + s for s in routed}
    want = {}
    for name, (dtype, shape, raw) in checkpoint_bytes(src).items():
        if not name.startswith(prefix):
            continue
        if m := expert_re.match(name):
            if int(m[1]) in expected:
                want[f"{prefix}experts.{expected.index(int(m[1]))}.{m[2]}"] = (dtype, shape, raw)
        elif name in sliced:
            want[name] = (dtype, [n, *shape[1:]], take_bytes(raw, shape, expected))
        else:
            want[name] = (dtype, shape, raw)
    assert {k: v for k, v in checkpoint_bytes(out).items() if k.startswith(prefix)} == want
    info = json.loads((out / "pruning.json").read_text())
    assert info["expert_map"][str(mtp)] == expected

    ids = input_ids()
    with torch.no_grad():
        got = load_model(out)(ids).logits
    drop = {layer: sorted(set(range(NUM_EXPERTS)) - set(k)) for layer, k in main_keep.items()}
    assert (got - masked_logits(src, drop, ids)).abs().max().item() <= TOL
