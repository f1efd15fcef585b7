"""The task scores of `eval --tasks` as rows: one per task and metric, the model's value and standard
error, and with a reference the reference's and the difference (model − reference)."""

from __future__ import annotations


def task_rows(tasks: dict) -> list[dict]:
    """Rows {task, metric, value, stderr[, reference, reference_stderr, delta]} from the `tasks` entry of an
    `eval` result (its "model" and optional "reference" runs of `surgery.eval.tasks.run_tasks`)."""
    model = tasks["model"]["results"]
    reference = (tasks.get("reference") or {}).get("results")
    rows = []
    for task, entry in model.items():
        for metric, value in entry["metrics"].items():
            row = {"task": task, "metric": metric, "value": value, "stderr": entry["stderr"].get(metric)}
            if reference is not None:
                ref = reference.get(task, {})
                ref_value = ref.get("metrics", {}).get(metric)
                row["reference"] = ref_value
                row["reference_stderr"] = ref.get("stderr", {}).get(metric)
                row["delta"] = None if ref_value is None else value - ref_value
            rows.append(row)
    return rows


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_tasks(tasks: dict) -> str:
    """A plain-text table of the task scores, then the request count and time."""
    rows = task_rows(tasks)
    with_ref = "reference" in tasks
    header = ["task", "metric", "model", "±stderr"] + (["reference", "±stderr", "delta"] if with_ref else [])
    table = []
    for r in rows:
        cells = [r["task"], r["metric"], _num(r["value"]), _num(r["stderr"])]
        if with_ref:
            cells += [_num(r["reference"]), _num(r["reference_stderr"]), _num(r["delta"], signed=True)]
        table.append(cells)
    widths = [max(len(c[i]) for c in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header, *table]]
    for run in ("model", "reference"):
        t = (tasks.get(run) or {}).get("timing")
        if t:
            per = t["seconds_per_1000_requests"]
            lines.append(f"{run}: {t['requests']} requests in {t['request_seconds']:.1f} s"
                         + (f" ({per:.1f} s per 1,000)" if per is not None else "") + f", {t['seconds']:.1f} s in all")
    return "\n".join(lines)
