"""Downstream accuracy through EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`).

The model is the one this project's loader built (`surgery.model.load_model`), handed to lm-eval's
HFLM as an object, so MoNE novice and quantized checkpoints evaluate exactly as `eval` measures their
perplexity. lm-eval is an optional dependency (`pip install 'moe-surgery[eval]'`), imported only here.

Tasks are lm-eval task names (their data come from the Hub) or local YAML files in lm-eval's format;
a local file's relative `data_files` are read from its own folder, and the `datasets` cache of local
tasks goes to a temporary folder removed afterwards, so an offline run writes nothing elsewhere.
"""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError

EXTRA = "pip install 'moe-surgery[eval]'"
_YAML_SUFFIXES = (".yaml", ".yml")
_REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class TaskError(UserError):
    """A task that cannot be found or read, or lm-eval missing (one-line message, exit 2)."""


@dataclass(frozen=True)
class TaskOptions:
    """`tasks`: names or YAML paths (comma-separated entries allowed); `num_fewshot` None keeps each task's
    own; `limit` caps the documents per task (None: all)."""

    tasks: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: int | None = None

    @property
    def specs(self) -> list[str]:
        return [s.strip() for entry in self.tasks for s in entry.split(",") if s.strip()]


def import_lm_eval():
    """lm_eval and its HFLM class, or one line naming the extra that installs them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise TaskError(f"--tasks needs lm-evaluation-harness ({e.name or 'lm_eval'} is not installed): {EXTRA}") from None
    return lm_eval, HFLM


def _is_path(spec: str) -> bool:
    return spec.endswith(_YAML_SUFFIXES) or "/" in spec or Path(spec).is_dir()


def _yaml_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _YAML_SUFFIXES)
        if not files:
            raise TaskError(f"{spec}: no .yaml task file in this folder")
        return files
    if not path.is_file():
        raise TaskError(f"{spec}: no such task file")
    return [path]


def local_task(path: Path, cache_dir: Path) -> dict:
    """An lm-eval task config from a YAML file, its relative data files made absolute (relative to the
    file's folder) and its `datasets` cache in `cache_dir`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as e:  # noqa: BLE001 — yaml, include and !function errors all mean a bad task file
        raise TaskError(f"{path}: not a readable lm-eval task file ({_first_line(e)})") from None
    if not isinstance(config.get("task"), str):
        raise TaskError(f"{path}: no `task:` name; a local task file needs one (groups are not supported)")
    config = copy.deepcopy(config)
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        kwargs["data_files"] = _absolute(files, path.parent.resolve())
        missing = [f for f in _flat(kwargs["data_files"]) if "://" not in f and not any(c in f for c in "*?[")
                   and not Path(f).is_file()]
        if missing:
            raise TaskError(f"{path}: data file {missing[0]} not found")
    kwargs["cache_dir"] = str(cache_dir)
    config["dataset_kwargs"] = kwargs
    return config


def _absolute(files, base: Path):
    """data_files as `datasets` takes them (a path, a list, or a split → path(s) mapping), made absolute."""
    if isinstance(files, str):
        return files if "://" in files or Path(files).is_absolute() else str(base / files)
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {split: _absolute(f, base) for split, f in files.items()}
    return files


def _flat(files) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, (list, dict)):
        return [f for item in (files.values() if isinstance(files, dict) else files) for f in _flat(item)]
    return []


def resolve_tasks(specs: Iterable[str], cache_dir: Path) -> tuple[list, object]:
    """Task configs (local files) and names (lm-eval's tasks), checked before any model is loaded, and the
    lm-eval TaskManager that loads them: indexing lm-eval's ~15k task files takes seconds, so it is done
    only when a name is given, once."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    out: list = []
    names: list[str] = []
    for spec in specs:
        if _is_path(spec):
            out += [local_task(p, cache_dir) for p in _yaml_files(spec)]
        else:
            names.append(spec)
            out.append(spec)
    if not out:
        raise TaskError("--tasks: no task given")
    manager = TaskManager(include_defaults=bool(names))
    if names:
        _check_names(names, manager)
    return out, manager


def _check_names(names: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TaskError(f"unknown task {unknown[0]!r}: neither a YAML file nor one of lm-eval's {len(known)} tasks "
                        "(`lm-eval ls tasks` lists them)")


@contextmanager
def task_cache() -> Iterator[Path]:
    """The temporary `datasets` cache of local tasks, removed when the evaluation ends."""
    with tempfile.TemporaryDirectory(prefix="moe-surgery-tasks-") as tmp:
        yield Path(tmp)


@contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """lm-eval records `git describe` of the working folder with git's stderr left on the terminal, so outside a
    repository every run printed "fatal: not a git repository". The same call with that stderr discarded."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)

    def quiet() -> str | None:
        try:
            out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
            return out.strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    if original is not None:
        evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def run_tasks(model, tokenizer, tasks: list, manager, options: TaskOptions, *, batch_size: int = 8) -> dict:
    """Run `tasks` with `manager` (both from `resolve_tasks`) on an already loaded model; one entry per task
    with its metrics and their standard errors, plus the requests run and the seconds they took."""
    lm_eval, HFLM = import_lm_eval()

    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. the "pretrained is not a str" warning: passing the model is the design
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        counts, spent, cpu = _count_requests(lm)
        start = time.perf_counter()
        with _quiet_git_hash():
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=options.num_fewshot, limit=options.limit, log_samples=False,
                bootstrap_iters=1000, task_manager=manager)
        seconds = time.perf_counter() - start
    except (OSError, ValueError, KeyError) as e:  # a missing data file, a bad template or field
        raise TaskError(f"lm-eval could not run the tasks: {_first_line(e)}") from None
    finally:
        quiet.setLevel(level)
    requests, in_requests = sum(counts.values()), sum(spent.values())
    return {
        "results": summarize(raw),
        "timing": {"requests": requests, "request_types": {k: v for k, v in counts.items() if v},
                   "seconds": round(seconds, 3), "request_seconds": round(in_requests, 3),
                   "request_cpu_seconds": round(sum(cpu.values()), 3),
                   "seconds_per_1000_requests": round(1000 * in_requests / requests, 3) if requests else None},
    }


def _count_requests(lm) -> tuple[dict[str, int], dict[str, float], dict[str, float]]:
    """Wrap the model's request methods (lm-eval calls them by name) to count the requests they are given
    and the wall and process CPU seconds they take (the model's work, without task building and scoring;
    CPU seconds tell the work apart from waiting on a shared machine)."""
    counts = {name: 0 for name in _REQUEST_TYPES}
    spent = {name: 0.0 for name in _REQUEST_TYPES}
    cpu = {name: 0.0 for name in _REQUEST_TYPES}

    def counted(name: str):
        method = getattr(lm, name)

        def call(requests, *args, **kwargs):
            counts[name] += len(requests)
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return method(requests, *args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu

        return call

    for name in _REQUEST_TYPES:
        setattr(lm, name, counted(name))
    return counts, spent, cpu


def summarize(raw: dict) -> dict:
    """{task: {"metrics": {name: value}, "stderr": {name: value or None}, "samples": n, "num_fewshot": k}}
    from simple_evaluate's result; lm-eval's "metric,filter" keys lose the filter when it is "none"."""
    out = {}
    for task, values in raw["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            label = name if filt == "none" else f"{name} ({filt})"
            if name.endswith("_stderr"):
                stderr[label.replace("_stderr", "", 1)] = value if math.isfinite(value) else None
            else:
                metrics[label] = float(value)
        for label in metrics:
            stderr.setdefault(label, None)
        samples = (raw.get("n-samples") or {}).get(task, {}).get("effective")
        out[task] = {"metrics": metrics, "stderr": stderr, "samples": samples,
                     "num_fewshot": (raw.get("n-shot") or {}).get(task)}
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
