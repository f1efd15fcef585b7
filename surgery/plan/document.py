"""The typed plan: which expert ids each MoE layer keeps, and how they were chosen.

A plan is JSON on disk: `{"keep": {"<layer>": [expert ids]}, ...}`. Plans made by scoring also
carry the criterion, the ratio removed, the scores and the statistics file's hash; other keys
(`auto`, `rounds`, `mode`, `num_experts`, ...) travel in `extra`. Layers not named are left
untouched. `Plan.validate(layout)` checks a plan against a model (see surgery.plan.constraints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.architectures import MoELayout
from surgery.errors import PlanError
from surgery.io.provenance import keep_map
from surgery.plan.constraints import complete

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Plan:
    """`keep`: MoE layer → kept expert ids, in their new order. `scores`: layer → the criterion's score
    per expert (None for undefined ones); None when the plan was not made from scores of its own.
    `label` names the plan in error messages (its file, or e.g. "reap plan"). `document` is the JSON a
    plan was read from, which `to_json` gives back unchanged (pruning.json copies plans as written)."""

    keep: Mapping[int, tuple[int, ...]]
    criterion: str | None = None
    ratio: float | None = None
    scores: Mapping[int, tuple[float | None, ...]] | None = None
    stats_sha256: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)
    label: str = field(default="plan", compare=False)
    document: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", {layer: tuple(ids) for layer, ids in self.keep.items()})
        if self.scores is not None:
            object.__setattr__(self, "scores", {layer: _json_scores(s) for layer, s in self.scores.items()})

    # -- reading

    @classmethod
    def from_json(cls, doc: object, label: str = "plan") -> Plan:
        """A plan from its JSON document; only `keep` is required (and checked), other keys are carried."""
        if not isinstance(doc, dict) or not isinstance(doc.get("keep"), dict):
            raise PlanError(f"{label}: a plan needs a \"keep\" object mapping layer index to expert ids")
        known = ("keep", "criterion", "ratio", "keep_per_layer", "scores", "stats_sha256", "uniform")
        return cls(
            keep=keep_map(doc["keep"], label, "keep", PlanError),
            criterion=doc.get("criterion") if isinstance(doc.get("criterion"), str) else None,
            ratio=doc.get("ratio") if isinstance(doc.get("ratio"), (int, float)) else None,
            stats_sha256=doc.get("stats_sha256") if isinstance(doc.get("stats_sha256"), str) else None,
            extra={k: v for k, v in doc.items() if k not in known},
            label=label,
            document=doc,
        )

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        """The plan in a JSON file; one-line PlanErrors name the file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(doc, str(path))

    # -- checking

    def validate(self, layout: MoELayout) -> Plan:
        """This plan checked against the model and completed: ids sorted, MTP layers given the last main
        layer's keep-list. `to_json` of the result still gives the plan as chosen, except for a bare keep
        map (no criterion, not read from JSON), which is recorded completed."""
        chosen = self.document if self.document is not None or self.criterion is None else self.to_json()
        return replace(self, keep=complete(layout, self.keep, self.label), document=chosen)

    # -- numbers

    @property
    def counts(self) -> dict[int, int]:
        """Experts kept per named layer."""
        return {layer: len(ids) for layer, ids in self.keep.items()}

    @property
    def uniform(self) -> bool:
        return len(set(self.counts.values())) <= 1

    def keep_lists(self) -> dict[int, list[int]]:
        """`keep` with lists, for code that indexes or extends them."""
        return {layer: list(ids) for layer, ids in self.keep.items()}

    # -- writing

    def to_json(self) -> dict:
        """The JSON document. Scored plans: keep, criterion, ratio, keep_per_layer (an int when uniform,
        else {"<layer>": count}), scores and stats_sha256 (when scores are set), uniform, then `extra`."""
        if self.document is not None:
            return self.document
        if self.criterion is None:
            return {"keep": {str(layer): list(ids) for layer, ids in self.keep.items()}, **self.extra}
        counts = {str(layer): len(self.keep[layer]) for layer in sorted(self.keep)}
        doc: dict = {
            "keep": {str(layer): list(self.keep[layer]) for layer in sorted(self.keep)},
            "criterion": self.criterion,
            "ratio": self.ratio,
            "keep_per_layer": next(iter(counts.values()), 0) if self.uniform else counts,
        }
        if self.scores is not None:
            doc["scores"] = {str(layer): list(self.scores[layer]) for layer in sorted(self.scores)}
            doc["stats_sha256"] = self.stats_sha256
        return {**doc, "uniform": self.uniform, **self.extra}


def _json_scores(scores: Sequence[float | None] | np.ndarray) -> tuple[float | None, ...]:
    """JSON has no infinities: undefined scores (-inf, or None as read back) are kept as None."""
    import numpy as np  # only plans with scores come here: a hand-made plan is read without numpy

    return tuple(None if s is None or not np.isfinite(s) else float(s) for s in scores)


def read_plan_for(path: str | Path, model_dir: str | Path) -> dict[int, list[int]]:
    """A plan file's keep-lists, validated against the model in `model_dir` and extended to its MTP layers."""
    from surgery.architectures import resolve
    from surgery.io import Checkpoint

    with Checkpoint(model_dir) as ckpt:
        layout = resolve(ckpt.config, ckpt.names(), str(ckpt.config_path))
    return Plan.read(path).validate(layout).keep_lists()

