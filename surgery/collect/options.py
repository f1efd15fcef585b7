"""How to collect: one frozen record of every choice `collect` takes (torch-free, so the CLI can build it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CollectOptions:
    """The calibration pass's settings; `surgery.collect.run.collect(model_dir, data, output, options)`.

    `progressive` ({layer: kept expert ids}): those layers behave as pruned while collecting
    (see surgery.collect.progressive); their dropped experts get zero statistics.
    `gradients`: None, or "per-sequence" / "accumulated": also back-propagate each main sequence's loss
    and write the gradient fields of each sequence's gradient, or of their sum (surgery.collect.gradients).
    `histogram`: also write `out_hist` (for mcs-eao). `merge_stats`: also write the merging fields (for
    prune --merge hc-smoe / mc-smoe). `sampling`: "packed" or "documents" (surgery.model.data.build_sequences).
    `device` / `dtype`: None or "auto" choose (cuda when present; bfloat16 on GPU, float32 on CPU).
    `holdout`: None = default_holdout(samples). `stream_layers`: True streams one decoder layer at a
    time, False loads the whole model, None ("auto") streams only when the model does not fit in the
    device's free memory. `prefetch`: while streaming, read layer i+1 while layer i computes.
    """

    samples: int = 256
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 4
    holdout: int | None = None
    device: str | None = None
    dtype: str | None = None
    stream_layers: bool | None = None
    prefetch: bool = True
    hidden_states: str = "auto"
    progress: bool = True
    progressive: Mapping[int, list[int]] | None = None
    gradients: str | None = None
    histogram: bool = False
    merge_stats: bool = False
    sampling: str = "packed"

    def __post_init__(self) -> None:
        if self.gradients not in (None, "per-sequence", "accumulated"):
            raise ValueError(f"gradients={self.gradients!r}: use None, 'per-sequence' or 'accumulated'")
        if self.sampling not in ("packed", "documents"):
            raise ValueError(f"sampling={self.sampling!r}: use 'packed' or 'documents'")


MAX_HOLDOUT = 32


def default_holdout(samples: int) -> int:
    """Held-out sequences when --holdout is not given: one per 8 calibration sequences, at least 1, at most 32."""
    return min(MAX_HOLDOUT, max(1, samples // 8))
