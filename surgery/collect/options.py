"""How to collect: one frozen record of every choice `collect` takes (torch-free, so the CLI can build it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CollectOptions:
    """The calibration pass's settings; `surgery.collect.run.collect(model_dir, data, output, options)`.

    `progressive` ({layer: kept expert ids}): those layers behave as pruned while collecting
    (see surgery.collect.progressive); their dropped experts get zero statistics.
    `gradients`: also back-propagate each main sequence's loss and write the gradient fields
    (see surgery.collect.gradients). `histogram`: also write `out_hist` (for mcs-eao).
    `device` / `dtype`: None or "auto" choose (cuda when present; bfloat16 on GPU, float32 on CPU).
    """

    samples: int = 256
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 4
    holdout: int = 32
    device: str | None = None
    dtype: str | None = None
    stream_layers: bool = False
    hidden_states: str = "auto"
    progress: bool = True
    progressive: Mapping[int, list[int]] | None = None
    gradients: bool = False
    histogram: bool = False
