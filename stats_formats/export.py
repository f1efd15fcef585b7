"""Exports of a statistics file: per-expert summary rows, CSV, JSON and the `stats show` table."""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

from stats_formats.file import StatsFile
from stats_formats.schema import SCHEMA_NAME

SUMMARY_COLUMNS = (
    "layer", "expert", "count", "count_share", "mean_gate", "mean_out_norm", "mean_sq_out_norm",
    "reap", "prob_sum", "out_norm_max", "inter_norm_mean",
)


def _ratio(num: float, den: float) -> float | None:
    """A mean over zero tokens is undefined, not zero: exports show it as null / empty."""
    return float(num / den) if den > 0 else None


def expert_summary(stats: StatsFile, layer: int) -> list[dict[str, int | float | None]]:
    """Per-expert means over the tokens routed to each expert (columns SUMMARY_COLUMNS)."""
    count = stats.get(layer, "count")
    moment = stats.get(layer, "moment_g")
    prob_sum = stats.get(layer, "prob_sum")
    norm_max = stats.get(layer, "out_norm_max")
    inter = stats.get(layer, "inter_norm_sum")
    total = float(count.sum())
    rows = []
    for i in range(stats.num_experts):
        n = float(count[i])
        rows.append({
            "layer": layer,
            "expert": i,
            "count": n,
            "count_share": _ratio(n, total),
            "mean_gate": _ratio(moment[1, 0, i], n),
            "mean_out_norm": _ratio(moment[0, 1, i], n),
            "mean_sq_out_norm": _ratio(moment[0, 2, i], n),
            "reap": _ratio(moment[1, 1, i], n),
            "prob_sum": float(prob_sum[i]),
            "out_norm_max": float(norm_max[i]),
            "inter_norm_mean": _ratio(inter[i], n),
        })
    return rows


def to_json(stats: StatsFile) -> str:
    """Everything in one JSON document: metadata, per-expert summary and every tensor as nested lists."""
    layers = []
    for layer in stats.layers:
        entry: dict[str, Any] = {
            "layer": layer,
            "experts": expert_summary(stats, layer),
            "tensors": {name: values.tolist() for name, values in stats.layer(layer).items()},
        }
        if stats.has_holdout:
            entry["holdout"] = {name: values.tolist() for name, values in stats.layer(layer, True).items()}
        layers.append(entry)
    return json.dumps({"metadata": stats.metadata, "sha256": stats.sha256, "layers": layers})


def _csv_value(value: int | float | None) -> str:
    """Exact round-trip text; integral values without a trailing '.0'; undefined means as empty cells."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def to_csv(stats: StatsFile) -> str:
    """One row per (layer, expert) with the summary columns, for spreadsheets and pandas."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for layer in stats.layers:
        for row in expert_summary(stats, layer):
            writer.writerow([_csv_value(row[c]) for c in SUMMARY_COLUMNS])
    return out.getvalue()


_TABLE_COLUMNS = (("layer", 5), ("tokens", 10), ("min share", 9), ("max share", 9),
                  ("mean gate", 9), ("mean norm", 9), ("dead", 4))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_row(cells: Sequence[str]) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, _TABLE_COLUMNS))


def _layer_row(stats: StatsFile, layer: int) -> str:
    """Shares are of all routings in the layer; gate and norm are means over routed tokens."""
    count = stats.get(layer, "count")
    moment = stats.get(layer, "moment_g")
    total = float(count.sum())
    shares = count / total if total > 0 else None
    return _table_row((
        str(layer),
        str(int(stats.get(layer, "tokens")[0])),
        _fmt(None if shares is None else float(shares.min()), ".4f"),
        _fmt(None if shares is None else float(shares.max()), ".4f"),
        _fmt(_ratio(moment[1, 0].sum(), total), ".4g"),
        _fmt(_ratio(moment[0, 1].sum(), total), ".4g"),
        str(int((count == 0).sum())),
    ))


def summary_table(stats: StatsFile) -> str:
    """What `moe-surgery stats show` prints: provenance, then one line per MoE layer."""
    m, c = stats.model, stats.calibration
    holdout = "present" if stats.has_holdout else "absent"
    lines = [
        f"{stats.label}: {SCHEMA_NAME} {stats.version}, sha256 {stats.sha256}",
        f"created {stats.metadata['created']} by moe-surgery {stats.metadata['tool_version']}",
        f"model: {m['model_type']}, {len(stats.layers)} MoE layers of {m['num_hidden_layers']}, "
        f"{m['num_experts']} experts (top-{m['top_k']}), hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}",
        f"config sha256 {m['config_sha256']}, router sha256 {m['router_sha256']}",
        f"calibration: {c['num_sequences']} sequences, {c['num_tokens']} tokens, seq_len {c['seq_len']}, "
        f"seed {c['seed']}, holdout {c['holdout_sequences']} sequences (tensors {holdout})",
        f"sources: {', '.join(c['sources']) or '-'}",
        "",
        _table_row([name for name, _ in _TABLE_COLUMNS]),
    ]
    lines += [_layer_row(stats, layer) for layer in stats.layers]
    return "\n".join(lines)
