"""The typed Plan (surgery.plan.document) and the pruning.json reader (surgery.io.provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery.errors import CheckpointError, PlanError
from surgery.io import provenance
from surgery.plan import Plan


def test_a_plan_read_from_json_is_written_back_unchanged(tmp_path: Path) -> None:
    doc = {"criterion": "mine", "keep": {"3": [5, 1], "1": [0, 2]}, "note": [1, 2]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    plan = Plan.read(path)
    assert plan.keep == {3: (5, 1), 1: (0, 2)} and plan.criterion == "mine" and plan.label == str(path)
    assert json.dumps(plan.to_json()) == json.dumps(doc)
    assert plan.extra == {"note": [1, 2]}


def test_scored_plan_json_layout() -> None:
    plan = Plan({1: [0, 2], 0: [1, 2]}, "reap", 0.25, {0: np.array([1.0, -np.inf]), 1: [None, 2.0]}, "ab",
                {"seed": 3})
    assert list(plan.to_json()) == ["keep", "criterion", "ratio", "keep_per_layer", "scores", "stats_sha256",
                                    "uniform", "seed"]
    assert plan.to_json()["keep"] == {"0": [1, 2], "1": [0, 2]}
    assert plan.to_json()["scores"] == {"0": [1.0, None], "1": [None, 2.0]}
    without_scores = Plan({0: [1], 1: [0, 1]}, "reap", 0.5, extra={"mode": "iterative"}).to_json()
    assert list(without_scores) == ["keep", "criterion", "ratio", "keep_per_layer", "uniform", "mode"]
    assert without_scores["keep_per_layer"] == {"0": 1, "1": 2} and without_scores["uniform"] is False
    assert Plan({2: [1, 0]}).to_json() == {"keep": {"2": [1, 0]}}


@pytest.mark.parametrize("doc, problem", [
    ([], "a plan needs a \"keep\" object"),
    ({"keep": []}, "a plan needs a \"keep\" object"),
    ({"keep": {"x": [1]}}, r"keep\['x'\] must be a list of integer expert ids"),
    ({"keep": {"1": [1, True]}}, r"keep\['1'\] must be a list"),
    ({"keep": {"1": "12"}}, r"keep\['1'\] must be a list"),
])
def test_bad_plans_are_refused_naming_the_plan(doc: object, problem: str) -> None:
    with pytest.raises(PlanError, match=f"^my.json: {problem}"):
        Plan.from_json(doc, "my.json")


def test_plan_files_that_are_not_json(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="plan file not found"):
        Plan.read(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="bad.json: not valid JSON"):
        Plan.read(tmp_path / "bad.json")


def test_provenance_reads_one_way(tmp_path: Path) -> None:
    assert provenance.read(tmp_path) == {}
    with pytest.raises(CheckpointError, match=r"pruning.json: missing; heal needs it"):
        provenance.read(tmp_path, needed_for="heal needs it")
    provenance.write(tmp_path, {"expert_map": {"1": [3, 0]}})
    assert (tmp_path / "pruning.json").read_text() == '{\n  "expert_map": {\n    "1": [\n      3,\n      0\n    ]\n  }\n}\n'
    assert provenance.expert_map(provenance.read(tmp_path), tmp_path) == {1: [3, 0]}
    for bad in ("[1]", "{", '{"expert_map": {"a": [1]}}'):
        (tmp_path / "pruning.json").write_text(bad)
        with pytest.raises(CheckpointError, match="pruning.json: "):
            provenance.expert_map(provenance.read(tmp_path), tmp_path)
