"""The scoring choices of `score`, `prune` and `sparsify` (ScoreOptions), apart from the scoring itself
(surgery.pipeline.score, which imports numpy, the criteria and stats_formats): the CLI and `prune --plan`
build one without importing any of that. surgery.pipeline.score re-exports both names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GLOBAL_WARNING = (
    "Warning: --global gives a non-uniform plan (expert counts differ per layer); vanilla transformers "
    "cannot load such a checkpoint (prune needs --allow-nonuniform)"
)


@dataclass(frozen=True)
class ScoreOptions:
    """How to turn scores into a plan: the criterion and how many experts each layer keeps.

    Exactly one of `ratio` (fraction removed per layer) and `keep` (experts kept per layer).
    `global_rank`: rank across layers (a non-uniform plan). `seed`: the `random` criterion's.
    `holdout_stats`: for `auto`, a second statistics file serving as held-out data.
    `drop` ("low" / "high"): override the criterion's drop direction (refused for set selectors and auto).
    """

    criterion: str | None
    ratio: float | None = None
    keep: int | None = None
    global_rank: bool = False
    seed: int = 0
    holdout_stats: Path | None = None
    drop: str | None = None
