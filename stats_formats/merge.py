"""Merging statistics of disjoint token sets of one model: exact, because the fields are sums."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from stats_formats.atomic import PathLike
from stats_formats.file import StatsFile
from stats_formats.schema import FIELD_BY_NAME, FIELDS, HOLDOUT_FIELDS, tensor_name
from stats_formats.validate import NUMPY_DTYPES, VOCAB_KEY, StatsError

MERGED_LABEL = "<merged>"


def _check_same_model(first: StatsFile, other: StatsFile) -> None:
    """Every key equal; a vocab_size only one side has is fine (the other predates token_bits, which is dropped)."""
    a, b = first.model, other.model
    for key in list(a) + [k for k in b if k not in a]:
        if key == VOCAB_KEY and (key not in a or key not in b):
            continue
        if a.get(key) != b.get(key):
            raise StatsError(
                f"{other.label}: model.{key} is {b.get(key)!r} but {first.label} has {a.get(key)!r}; "
                "statistics of different models cannot be merged"
            )


def _check_gradients(stats: Sequence[StatsFile], optional: list[str]) -> None:
    """Statistics of an accumulated gradient (`collect --gradients accumulated`) are nonlinear in the
    summed gradient: two files' values cannot be combined into those of the whole data."""
    if len(stats) > 1 and "grad_gram" in optional:
        for s in stats:
            if s.calibration.get("gradients") == "accumulated":
                raise StatsError(f"{s.label}: holds statistics of an accumulated gradient (collect --gradients "
                                 "accumulated), which cannot be merged; collect all the data in one run (torchrun "
                                 "is exact) or use --gradients per-sequence")


def _check_distinct(stats: Sequence[StatsFile]) -> None:
    """Two inputs with the same sums are the same tokens (a file given twice, or a copy): merged, every
    statistic would count them twice, silently. Compared on the first layer's fields, which differ for any
    two different token sets."""
    seen: dict[str, str] = {}
    for s in stats:
        digest = hashlib.sha256()
        for field in FIELDS:
            digest.update(np.ascontiguousarray(s.get(s.layers[0], field.name)).tobytes())
        key = digest.hexdigest()
        if key in seen:
            raise StatsError(f"{s.label}: holds the same statistics as {seen[key]}; merged, the same tokens would "
                             "count twice (give each file once)")
        seen[key] = s.label


def _merge_calibration(calibrations: Sequence[dict[str, Any]], gradients: bool) -> dict[str, Any]:
    """Sources are concatenated as given: a source listed in two files was sampled in both."""
    seq_lens = {c["seq_len"] for c in calibrations}
    seeds = {c["seed"] for c in calibrations}
    samplings = {c.get("sampling", "packed") for c in calibrations}  # files from before the key packed
    extra = {"sampling": samplings.pop() if len(samplings) == 1 else "mixed"}
    if gradients:  # one form: _check_gradients refused accumulated ones among several files
        extra["gradients"] = calibrations[0].get("gradients", "per-sequence")
    return {
        "sources": [s for c in calibrations for s in c["sources"]],
        "num_sequences": sum(c["num_sequences"] for c in calibrations),
        "num_tokens": sum(c["num_tokens"] for c in calibrations),
        "seq_len": max(seq_lens),
        "seed": seeds.pop() if len(seeds) == 1 else None,
        "holdout_sequences": sum(c["holdout_sequences"] for c in calibrations),
        **extra,
    }


def _combine(stats: Sequence[StatsFile], layer: int, field: str, how: str, holdout: bool) -> np.ndarray:
    """Accumulate one tensor across files, holding a single extra copy at a time."""
    total = np.array(stats[0].get(layer, field, holdout), dtype=NUMPY_DTYPES[FIELD_BY_NAME[field].dtype])
    op = {"max": np.maximum, "or": np.bitwise_or}.get(how, np.add)
    for s in stats[1:]:
        op(total, s.get(layer, field, holdout), out=total)
    return total


def merge(files: Sequence[StatsFile | PathLike], label: str = MERGED_LABEL) -> StatsFile:
    """Statistics of disjoint token sets combined exactly: sums add, maxima take the maximum.

    Files of another major version are refused when opened; the holdout slice and optional fields
    (`collect --gradients`, the MC-Suite fields) are kept only when every input has them. The result
    lives in memory; call `.save(path)` to write it.
    """
    if not files:
        raise ValueError("merge needs at least one statistics file")
    stats = [f if isinstance(f, StatsFile) else StatsFile(f) for f in files]
    for other in stats[1:]:
        _check_same_model(stats[0], other)
    holdout = all(s.has_holdout for s in stats)
    optional = [n for n in stats[0].optional_fields if all(n in s.optional_fields for s in stats[1:])]
    _check_gradients(stats, optional)
    _check_distinct(stats)
    tensors: dict[str, np.ndarray] = {}
    for layer in stats[0].layers:
        for field in (*FIELDS, *(FIELD_BY_NAME[n] for n in optional)):
            tensors[tensor_name(layer, field.name)] = _combine(stats, layer, field.name, field.merge, False)
        for name in HOLDOUT_FIELDS if holdout else ():
            how = FIELD_BY_NAME[name].merge
            tensors[tensor_name(layer, name, True)] = _combine(stats, layer, name, how, True)
    calibration = _merge_calibration([s.calibration for s in stats], "grad_gram" in optional)
    return StatsFile.from_arrays(dict(stats[0].model), calibration, tensors, label)
