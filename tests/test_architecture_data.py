"""Per-architecture facts are data in surgery/architectures/ and nowhere else.

(a) Every data file loads into the same ArchSpec the Python registry built before it became data
    (tests/fixtures/architecture_specs.json was generated from that registry at commit 6fb1b5f), and
    malformed files are refused with errors naming the file and the key.
(b) A source scan: outside surgery/architectures/, no code compares model_type / expert_math with a
    literal, and no string literal holds a model-specific tensor name, model_type or expert math kind.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from surgery.architectures import EXPERT_MATH, SPECS, get_spec, supported
from surgery.architectures.expert_math import (
    FUSED_DOWN, FUSED_GATE_UP, ROLE_PATTERNS, SHARED_RE, collectable_kinds, memory_fused,
)
from surgery.architectures.loader import ArchDataError, data_dir, load_specs

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "architecture_specs.json"
ARCH_DIR = ROOT / "surgery" / "architectures"


# ---------------------------------------------------------------------------------------------
# (a) the data reproduces the former registry


def _as_fixture(spec) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(spec)))
    d["mask_value"] = repr(spec.mask_value)
    return d


def test_data_files_reproduce_the_former_registry():
    expected = json.loads(FIXTURE.read_text())
    assert supported() == sorted(expected)
    for model_type, fields in expected.items():
        assert _as_fixture(SPECS[model_type]) == fields, model_type


def test_spec_field_types_are_the_registry_types():
    for spec in SPECS.values():
        for f in ("expert_keys", "top_k_keys", "prefixes", "router", "config_path", "fused", "memory_renames"):
            value = getattr(spec, f)
            assert isinstance(value, tuple) and all(isinstance(x, (str, tuple)) for x in value), (spec.model_type, f)
        for f in ("group_keys", "group_when"):
            assert getattr(spec, f) is None or isinstance(getattr(spec, f), tuple)
        assert isinstance(spec.mask_value, float)
    assert math.isinf(get_spec("qwen3_moe").mask_value) and get_spec("phimoe").mask_value == -1e9
    hash(get_spec("deepseek_v3"))  # frozen records stay hashable


def test_one_file_per_model_type_shipped_as_package_data():
    files = sorted(p.stem for p in data_dir().glob("*.json"))
    assert files == supported()
    assert 'surgery = ["architectures/data/*.json"]' in (ROOT / "pyproject.toml").read_text()


def test_every_kind_is_in_the_expert_math_table():
    assert {s.expert_math for s in SPECS.values()} <= set(EXPERT_MATH)
    assert collectable_kinds() == ("glu_halves", "gpt_oss")
    assert sorted(s.model_type for s in SPECS.values() if s.math.router_scales_input) == ["llama4", "llama4_text"]
    # hidden-size axis of each in-memory matrix: glu_halves [E, 2I, H] / [E, H, I]; gpt_oss [E, H, 2I] / [E, I, H]
    assert EXPERT_MATH["glu_halves"].matrices == (("gate_up_proj", 2), ("down_proj", 1))
    assert EXPERT_MATH["gpt_oss"].matrices == (("gate_up_proj", 1), ("down_proj", 2))


@pytest.mark.parametrize("name, role", [
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "gate"),
    ("model.layers.0.block_sparse_moe.experts.3.w3.weight", "up"),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "down"),
    ("model.layers.0.mlp.experts.3.gate_proj.weight", "gate"),
    ("model.layers.0.mlp.experts.3.up_proj.weight", "up"),
    ("model.layers.0.mlp.experts.3.down_proj.weight", "down"),
])
def test_on_disk_projection_names(name, role):
    assert [r for r, pat in ROLE_PATTERNS.items() if pat.search(name)] == [role]
    assert not ROLE_PATTERNS[role].search(name.replace(".weight", ".weight_scale_inv"))


def test_fused_and_shared_names():
    assert FUSED_GATE_UP.search("model.layers.1.mlp.experts.gate_up_proj")
    assert FUSED_GATE_UP.search("model.layers.1.block_sparse_moe.input_linear.weight")
    assert FUSED_DOWN.search("model.layers.1.block_sparse_moe.output_linear.weight")
    assert not FUSED_DOWN.search("model.layers.1.mlp.experts.gate_up_proj")
    assert SHARED_RE.search("model.layers.1.mlp.shared_expert.down_proj.weight")[1] == "down_proj"
    assert SHARED_RE.search("model.layers.1.mlp.shared_experts.gate_proj.weight")
    assert memory_fused("model.layers.1.mlp.experts.gate_up_proj").roles == ("gate", "up")
    assert memory_fused("mlp.experts.down_proj").roles == ("down",)
    assert memory_fused("model.layers.1.mlp.gate.weight") is None


# ---------------------------------------------------------------------------------------------
# (a) malformed data files


def _write(folder: Path, docs: dict[str, dict]) -> Path:
    for model_type, doc in docs.items():
        (folder / f"{model_type}.json").write_text(json.dumps(doc))
    return folder


BASE = {
    "model_type": "base_moe", "expert_keys": ["num_experts"], "top_k_keys": ["num_experts_per_tok"],
    "prefixes": [{"pattern": r"model\.layers\.(?P<layer>\d+)\.mlp"}], "router": [{"tensor": "gate.weight", "expert_axis": 0}],
}


def test_extends_inherits_all_but_notes(tmp_path):
    child = {"model_type": "child_moe", "extends": "base_moe", "expert_keys": ["n_routed_experts"]}
    specs = load_specs(_write(tmp_path, {"base_moe": {**BASE, "notes": "base only", "scoring": "sigmoid"},
                                         "child_moe": child}))
    assert specs["child_moe"].expert_keys == ("n_routed_experts",)
    assert specs["child_moe"].prefixes == specs["base_moe"].prefixes
    assert specs["child_moe"].scoring == "sigmoid" and specs["child_moe"].notes == ""


@pytest.mark.parametrize("docs, message", [
    ({"base_moe": {**BASE, "routers": []}}, r"base_moe\.json: unknown keys \['routers'\]"),
    ({"base_moe": {**BASE, "model_type": "other"}}, r"must equal the file name 'base_moe'"),
    ({"base_moe": {k: v for k, v in BASE.items() if k != "router"}}, r"base_moe\.json: missing router"),
    ({"base_moe": {**BASE, "prefixes": [{"pattern": r"model\.layers\.(\d+)"}]}}, r"prefixes: .*needs a \(\?P<layer>"),
    ({"base_moe": {**BASE, "prefixes": [{"pattern": "("}]}}, r"prefixes: bad regex"),
    ({"base_moe": {**BASE, "router": [{"tensor": "gate.weight"}]}}, r"router: expected keys tensor, expert_axis; missing \['expert_axis'\]"),
    ({"base_moe": {**BASE, "scoring": "softplus"}}, r"scoring: expected one of softmax"),
    ({"base_moe": {**BASE, "expert_math": "swiglu"}}, r"expert_math: expected one of glu_halves"),
    ({"base_moe": {**BASE, "expert_keys": "num_experts"}}, r"expert_keys: expected a list of strings"),
    ({"base_moe": {**BASE, "interleaved": 1}}, r"interleaved: expected true or false"),
    ({"base_moe": {**BASE, "mask_value": "-1e9"}}, r'mask_value: expected a number or "-inf"'),
    ({"base_moe": {**BASE, "extends": "nowhere"}}, r"extends 'nowhere', which has no data file"),
    ({"a_moe": {**BASE, "model_type": "a_moe", "extends": "b_moe"},
      "b_moe": {**BASE, "model_type": "b_moe", "extends": "a_moe"}}, r"extends cycle"),
])
def test_malformed_files_are_refused_naming_file_and_key(tmp_path, docs, message):
    with pytest.raises(ArchDataError, match=message):
        load_specs(_write(tmp_path, docs))


def test_invalid_json_is_refused(tmp_path):
    (tmp_path / "base_moe.json").write_text("{")
    with pytest.raises(ArchDataError, match=r"base_moe\.json: not valid JSON"):
        load_specs(tmp_path)


def test_architectures_import_no_torch():
    """architectures sits below io, which is torch-free."""
    for path in ARCH_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] in ("torch", "transformers", "numpy") for m in mods), path


# ---------------------------------------------------------------------------------------------
# (b) source scan

# Model-specific tensor names from the data files and the expert math table (whole words or dotted
# fragments inside any string literal; docstrings and comments are not scanned).
TENSOR_NAMES = [
    "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "input_linear", "output_linear",
    "block_sparse_moe", "feed_forward", "shared_expert", "shared_experts", "e_score_correction_bias",
    "moe_statics", "router.layer", "language_model", "experts_per_token",
]
# (path relative to the repository, word) -> why it has to stay. Empty: nothing had to.
ALLOWED: dict[tuple[str, str], str] = {}


def _sources() -> list[Path]:
    return [p for p in sorted((ROOT / "surgery").rglob("*.py")) if ARCH_DIR not in p.parents]


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_tensor_names_come_from_the_architectures_folder():
    """Every scanned name is one the architectures folder defines (the list is the registry's vocabulary)."""
    arch_text = "".join(p.read_text() for p in ARCH_DIR.rglob("*") if p.suffix in (".py", ".json"))
    for word in TENSOR_NAMES:
        assert word in arch_text.replace("\\.", "."), word


def test_no_model_specific_names_outside_architectures():
    words = TENSOR_NAMES + supported() + list(EXPERT_MATH)
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z0-9_])")
    found = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                text = node.value.replace("\\.", ".")
                for word in pattern.findall(text):
                    if (rel, word) not in ALLOWED:
                        found.append(f"{rel}:{node.lineno}: {word!r} in {node.value[:80]!r}")
    assert not found, "model-specific names outside surgery/architectures/ (move them there):\n" + "\n".join(found)


def _compared_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)
    return None


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_is_literal(e) for e in node.elts)


def test_no_model_type_or_kind_comparisons_outside_architectures():
    """No `model_type == "..."`, `model_type in ("...", ...)`, `expert_math == "..."` (or `kind`) branches."""
    watched = {"model_type", "expert_math", "kind"}
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = {_compared_name(s) for s in sides} & watched
            if names and any(_is_literal(s) for s in sides):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: compares {', '.join(sorted(names))} with a literal")
    assert not found, "\n".join(found)
