"""Evaluation results in a model card: the file `moe-surgery eval --json` writes, checked as untrusted
input, its perplexity and task scores as Markdown tables in the card's evaluation block (which carries the results
it shows, so that a later result of the other kind adds to them), and as the `model-index` metadata the Hub reads.

`model-index` is written as huggingface_hub's `ModelCardData(eval_results=[EvalResult(...)])` writes it
(task type, dataset name/type/args, metric type/value/name), one result per task.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from surgery.errors import UserError


EVAL_BEGIN = "<!-- moe-surgery:eval -->"
EVAL_END = "<!-- /moe-surgery:eval -->"
EVAL_DATA = "<!-- moe-surgery:eval-data "
_EVAL_DATA_RE = re.compile(re.escape(EVAL_DATA) + r"(.*?) -->")


class EvalResultsError(UserError):
    """An --eval-results file that is not what `eval --json` writes."""


def read_eval_results(path: str | Path) -> dict:
    """The content of an `eval --json` file, refused (one line naming the file) unless its perplexity
    and task parts have the shape the card needs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalResultsError(f"{path}: not a readable JSON file ({e})") from None
    check_eval_results(data, str(path))
    return data


def check_eval_results(data, where: str) -> None:
    """Refuse (one line naming `where`) what is not an `eval --json` result of the shape the card needs."""
    if not isinstance(data, dict) or not ("files" in data or "tasks" in data):
        raise EvalResultsError(f"{where}: not a `moe-surgery eval --json` result (no `files` or `tasks`)")
    try:
        if "files" in data:
            _check_perplexity(data)
        if "tasks" in data:
            _check_tasks(data["tasks"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise EvalResultsError(f"{where}: malformed `eval --json` result ({type(e).__name__}: {e})") from None


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _check_perplexity(data: dict) -> None:
    _number(data["geomean_ppl"])
    int(data["seq_len"])
    for f in data["files"]:
        str(f["domain"]), int(f["tokens"]), _number(f["ppl"])
        if "kl" in data:
            _number(f["kl"]), _number(f["top1"])
    if "kl" in data:
        _number(data["kl"]), _number(data["top1"])


def _check_tasks(tasks: dict) -> None:
    for run in ("model", "reference"):
        if run not in tasks and run == "reference":
            continue
        for name, entry in tasks[run]["results"].items():
            if not isinstance(name, str):
                raise TypeError(f"task name {name!r}")
            for metric, value in entry["metrics"].items():
                _number(value)
                stderr = entry["stderr"].get(metric)
                if stderr is not None:
                    _number(stderr)


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def tasks_section(tasks: dict) -> str:
    """The task scores as a Markdown table (with the reference's and the difference when it was run)."""
    from surgery.eval.task_report import task_rows

    with_ref = "reference" in tasks
    head = "| Task | Metric | Score | ± stderr |" + (" Reference | ± stderr | Δ |" if with_ref else "")
    rule = "|---|---|---:|---:|" + ("---:|---:|---:|" if with_ref else "")
    rows = []
    for r in task_rows(tasks):
        cells = [r["task"], r["metric"], _cell(r["value"]), _cell(r["stderr"])]
        if with_ref:
            cells += [_cell(r["reference"]), _cell(r["reference_stderr"]), _cell(r["delta"], signed=True)]
        rows.append("| " + " | ".join(cells) + " |")
    shots = tasks.get("num_fewshot")
    how = [f"lm-evaluation-harness {tasks.get('lm_eval_version', '')}".rstrip(),
           "each task's own few-shot setting" if shots is None else f"{shots}-shot"]
    if tasks.get("limit"):
        how.append(f"at most {tasks['limit']} documents per task")
    return "\n".join([f"`moe-surgery eval --tasks` ({', '.join(how)}):", "", head, rule, *rows, ""]) + "\n"


def model_index(model_name: str, tasks: dict) -> list[dict]:
    """The `model-index` metadata of the model's task scores (not the reference's)."""
    results = []
    for task, entry in tasks["model"]["results"].items():
        dataset = {"name": task, "type": task}
        shots = entry.get("num_fewshot")
        if isinstance(shots, int):
            dataset["args"] = {"num_few_shot": shots}
        metrics = [{"type": m.split(" ", 1)[0], "value": v, "name": m} for m, v in entry["metrics"].items()
                   if math.isfinite(v)]
        if metrics:
            results.append({"task": {"type": "text-generation"}, "dataset": dataset, "metrics": metrics})
    return [{"name": model_name, "results": results}] if results else []


def eval_block(result: dict | None) -> str:
    """The card's evaluation block; it carries the results it shows (JSON in a comment, no "--" inside) so that a
    later `eval` of the other kind (perplexity or tasks) adds to them instead of replacing them."""
    if not result:
        return f"{EVAL_BEGIN}\n{EVAL_END}"
    data = json.dumps(result, separators=(",", ":")).replace("--", "-\\u002d")
    return f"{EVAL_BEGIN}\n{_eval_section(result)}{EVAL_DATA}{data} -->\n{EVAL_END}"


def with_earlier(result: dict, card: str) -> dict:
    """`result` plus the perplexity or task results of the card's block that `result` has no counterpart for."""
    found = _EVAL_DATA_RE.search(card)
    try:
        earlier = json.loads(found.group(1)) if found else {}
        check_eval_results(earlier, "README.md")
    except (json.JSONDecodeError, EvalResultsError):  # none, or not ours to trust: the new result alone
        return result
    if "tasks" not in result and "tasks" in earlier:
        return {**result, "tasks": earlier["tasks"]}
    if "files" not in result and "files" in earlier:
        return {**{k: v for k, v in earlier.items() if k != "tasks"}, **result}
    return result


def _eval_section(result: dict) -> str:
    """The `eval` result as tables: perplexity (KL and top-1 columns only when a reference was compared)
    and task scores, each when present."""
    parts = (["## Evaluation", ""] + ([_perplexity_table(result)] if "files" in result else [])
             + ([tasks_section(result["tasks"])] if "tasks" in result else []))
    return "\n".join(parts)


def _perplexity_table(result: dict) -> str:
    ref = "kl" in result
    head = "| Data | Tokens | Perplexity |" + (" KL(reference ‖ model) | Top-1 agreement |" if ref else "")
    rule = "|---|---:|---:|" + ("---:|---:|" if ref else "")
    rows = [_eval_row(f["domain"], f"{f['tokens']:,}", f, ref) for f in result["files"]]
    mean = _eval_row("**Geometric mean**", "", {"ppl": result["geomean_ppl"], **result}, ref)
    stride = result.get("stride") or result["seq_len"]
    windows = f"windows of {result['seq_len']} tokens" + (f" every {stride}" if stride != result["seq_len"] else "")
    return "\n".join([
        f"`moe-surgery eval`, {windows}:",
        "",
        head, rule, *rows, mean,
        "",
    ]) + "\n"


def _eval_row(name: str, tokens: str, values: dict, ref: bool) -> str:
    cells = [name, tokens, f"{values['ppl']:.4g}"] + ([f"{values['kl']:.4g}", f"{values['top1']:.4f}"] if ref else [])
    return "| " + " | ".join(cells) + " |"
