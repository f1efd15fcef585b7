"""Shared fixtures: a session cache of tiny models and a CLI runner."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result

from surgery.cli import main
from tiny_models import build_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """`tiny(model_type, layout)`: a tiny checkpoint built once per session. Do not modify it."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple[str, str], Path] = {}

    def get(model_type: str, layout: str) -> Path:
        if (model_type, layout) not in cache:
            cache[model_type, layout] = build_tiny(model_type, root / f"{model_type}-{layout}", layout=layout)
        return cache[model_type, layout]

    return get


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    """`cli("prune", ...)`: run `moe-surgery` in-process; stderr is kept apart from stdout."""
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        return runner.invoke(main, [str(a) for a in args])

    return run
