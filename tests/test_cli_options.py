"""Every option is defined once (surgery/cli/options.py) and means the same in every command that takes it.

The walk loads every command of `moe-surgery` (the lazy ones too); each check is also run on a
made-up drift, so that it is known to fail when the rule is broken.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from surgery.cli import main
from surgery.cli.options import WEIGHT_CRITERIA

ROOT = Path(__file__).resolve().parent.parent

# The only options whose default depends on the command (factories in surgery/cli/options.py say why).
DEFAULTS_BY_COMMAND = {
    "--seq-len": {"collect": 2048, "prune": 2048, "heal": 1024, "eval": 512, "sparsify": 2048},
    "--batch-size": {"collect": 4, "prune": 4, "heal": 8, "eval": 8, "sparsify": 4},
    "--ratio": {"demo": 0.5, "prune": None, "score": None, "sparsify": None},
}


def _commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every leaf command by its path ("prune", "stats merge"), lazy commands loaded."""
    ctx = click.Context(group)
    out: dict[str, click.Command] = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        path = f"{prefix}{name}"
        out.update(_commands(cmd, path + " ") if isinstance(cmd, click.Group) else {path: cmd})
    return out


def _options(commands: dict[str, click.Command]) -> dict[str, list[tuple[str, click.Option]]]:
    """{option name: [(command, option)]} for every name of every option but --help."""
    by_name: dict[str, list[tuple[str, click.Option]]] = defaultdict(list)
    for path, cmd in commands.items():
        for param in cmd.params:
            if isinstance(param, click.Option):
                for name in param.opts + param.secondary_opts:
                    by_name[name].append((path, param))
    return by_name


def _same_type(a: click.ParamType, b: click.ParamType) -> bool:
    """The same object, or (flags, whose BOOL type click makes per option) equal descriptions."""
    return a is b or (type(a) is type(b) and a.to_info_dict() == b.to_info_dict())


def _drift(commands: dict[str, click.Command]) -> list[str]:
    """Options of one name whose help, type or default differ between commands (defaults: see DEFAULTS_BY_COMMAND)."""
    problems = []
    for name, uses in _options(commands).items():
        if len(uses) < 2:
            continue
        (first_cmd, first), rest = uses[0], uses[1:]
        for path, opt in rest:
            if opt.help != first.help:
                problems.append(f"{name}: help differs between {first_cmd} and {path}")
            if not _same_type(opt.type, first.type):
                problems.append(f"{name}: type differs between {first_cmd} ({first.type!r}) and {path} ({opt.type!r})")
        if name in DEFAULTS_BY_COMMAND:
            got = {path: opt.default for path, opt in uses}
            if got != DEFAULTS_BY_COMMAND[name]:
                problems.append(f"{name}: defaults {got}, expected {DEFAULTS_BY_COMMAND[name]}")
        elif any(opt.default != first.default for _, opt in rest):
            problems.append(f"{name}: default differs: {[(p, o.default) for p, o in uses]}")
    return problems


def _declared_names(paths: list[Path]) -> dict[str, list[str]]:
    """{option name: [file:line, ...]} of every `click.option("--x", ...)` / `click.Option([...])` literal."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("option", "Option")):
                continue
            for arg in node.args:
                for const in ast.walk(arg):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) and const.value.startswith("-"):
                        found[const.value.split("/")[0]].append(f"{path.name}:{node.lineno}")
    return found


def test_every_command_is_walked() -> None:
    commands = _commands()
    assert {"prune", "collect", "score", "sparsify", "eval", "heal", "demo", "push", "verify", "criteria",
            "architectures", "stats show", "stats merge", "stats export"} <= set(commands)


def test_shared_options_mean_the_same_everywhere() -> None:
    commands = _commands()
    shared = {name for name, uses in _options(commands).items() if len(uses) > 1}
    assert {"--seq-len", "--device", "--dtype", "--seed", "--overwrite", "--revision", "--ratio", "--criterion",
            "--output", "--data"} <= shared
    assert _drift(commands) == []


def test_drift_is_found() -> None:
    """The check fails on help, type or default drift, and on a per-command default that changed."""
    a = click.Command("a", params=[click.Option(["--x"], type=int, default=1, help="X.")])
    b = click.Command("b", params=[click.Option(["--x"], type=int, default=1, help="Another X.")])
    c = click.Command("c", params=[click.Option(["--x"], type=float, default=1, help="X.")])
    d = click.Command("d", params=[click.Option(["--x"], type=int, default=2, help="X.")])
    e = click.Command("eval", params=[click.Option(["--seq-len"], type=int, default=512, help="S.")])
    f = click.Command("heal", params=[click.Option(["--seq-len"], type=int, default=2048, help="S.")])
    assert _drift({"a": a, "b": b}) == ["--x: help differs between a and b"]
    assert len(_drift({"a": a, "c": c})) == 1 and "type differs" in _drift({"a": a, "c": c})[0]
    r1 = click.Command("r1", params=[click.Option(["--x"], type=click.FloatRange(0, 1), default=1, help="X.")])
    r2 = click.Command("r2", params=[click.Option(["--x"], type=click.FloatRange(0, 2), default=1, help="X.")])
    assert len(_drift({"r1": r1, "r2": r2})) == 1 and "type differs" in _drift({"r1": r1, "r2": r2})[0]
    assert len(_drift({"a": a, "d": d})) == 1 and "default differs" in _drift({"a": a, "d": d})[0]
    assert any("--seq-len: defaults" in p for p in _drift({"eval": e, "heal": f}))


def test_each_option_name_is_declared_once_in_the_source() -> None:
    declared = _declared_names(sorted((ROOT / "surgery").rglob("*.py")))
    assert "--ratio" in declared and "--seq-len" in declared
    assert {name: where for name, where in declared.items() if len(where) > 1} == {}


def test_source_scan_finds_a_second_declaration(tmp_path: Path) -> None:
    one = tmp_path / "one.py"
    one.write_text('import click\nx = click.option("--ratio", type=float)\ny = click.option("-o", "--out")\n')
    two = tmp_path / "two.py"
    two.write_text('import click\nz = click.option("--ratio", help="again")\n')
    assert _declared_names([one, two])["--ratio"] == ["one.py:2", "two.py:2"]
    assert _declared_names([one])["--out"] == ["one.py:3"]


def test_values_are_validated_as_they_are_parsed(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_ratio = runner.invoke(main, ["prune", str(tmp_path), "-o", str(tmp_path / "o"), "--criterion", "reap",
                                     "--ratio", "1"])
    assert bad_ratio.exit_code == 2 and "0<=x<1" in bad_ratio.output
    bad_device = runner.invoke(main, ["collect", str(tmp_path), "-d", "x", "-o", str(tmp_path / "s"),
                                      "--device", "gpu"])
    assert bad_device.exit_code == 2 and "cuda:N" in bad_device.output
    bad_criterion = runner.invoke(main, ["score", "--criterion", "nope", "--ratio", "0.5", "-o", str(tmp_path / "p")])
    assert bad_criterion.exit_code == 2 and "unknown criterion 'nope'" in bad_criterion.output
    assert "reap" in bad_criterion.output and "mcs-egn" in bad_criterion.output  # the names are listed
    bad_member = runner.invoke(main, ["score", "--criterion", "family:1,3,1", "--ratio", "0.5", "-o", str(tmp_path / "p")])
    assert bad_member.exit_code == 2 and "'family:1,3,1' is not family:M,A,B" in bad_member.output
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        ctx = _commands()["eval"].make_context("eval", ["m", "-d", "x", "--device", device])
        assert ctx.params["device"] == device


def test_earlier_spellings_still_parse() -> None:
    commands = _commands()
    ctx = commands["sparsify"].make_context("sparsify", ["m", "-o", "o", "--remove-ratio", "0.25", "--criterion", "reap"])
    assert ctx.params["ratio"] == 0.25 and ctx.params["criterion"] == "reap"
    ctx = commands["collect"].make_context("collect", ["m", "-d", "x", "-o", "s", "--progressive=plan.json"])
    assert ctx.params["progressive_plan"] == Path("plan.json")
    with pytest.raises(click.UsageError, match=r"extra argument \(--progressive\)"):  # after "--": not renamed
        commands["collect"].make_context("collect", ["m", "-d", "x", "-o", "s", "--", "--progressive"])


def test_criterion_help_names_every_weight_criterion() -> None:
    from surgery.criteria import CRITERIA

    assert set(WEIGHT_CRITERIA) == {name for name, crit in CRITERIA.items() if crit.needs == "weights"}
    help_text = _options(_commands())["--criterion"][0][1].help
    assert all(name in help_text for name in WEIGHT_CRITERIA)


def test_prune_and_verify_never_import_torch(tmp_path: Path) -> None:
    from tiny_models import build_tiny

    src = build_tiny("qwen3_moe", tmp_path / "src")
    script = (
        "import sys\n"
        "from surgery.cli import main\n"
        "for args in (['prune', sys.argv[1], '--criterion', 'random', '--ratio', '0.5', '-o', sys.argv[2]],\n"
        "             ['verify', sys.argv[2]]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    assert run.stdout.strip().splitlines()[-1] == "False False", run.stdout + run.stderr
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["num_experts_after"] > 0


def test_prune_plan_imports_no_heavy_module(tmp_path: Path) -> None:
    """`prune --plan` on a local folder is a byte copy: start-up imports neither numpy (the rewriter never
    decodes a tensor) nor huggingface_hub (the Hub client and the model card's YAML), torch or transformers,
    nor tqdm for a write too small to need a bar (surgery.io.derived.BAR_MIN_BYTES)."""
    from tiny_models import build_tiny

    src = build_tiny("qwen3_moe", tmp_path / "src")
    (tmp_path / "plan.json").write_text(json.dumps({"keep": {"0": [0, 2, 3, 5, 6, 7], "2": [1, 2, 3, 4, 5, 6]}}))
    script = (
        "import sys\n"
        "from surgery.cli import main\n"
        "main(['prune', sys.argv[1], '--plan', sys.argv[2], '-o', sys.argv[3]], standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in {'numpy', 'huggingface_hub', 'httpx', 'httpx2', 'torch', 'transformers',\n"
        "                                    'tqdm'}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "plan.json"), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout + run.stderr
    assert (tmp_path / "out" / "README.md").is_file()
    assert json.loads((tmp_path / "out" / "pruning.json").read_text())["num_experts_after"] == 6


@pytest.mark.parametrize("args,message", [
    (["prune", "m", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["prune", "m", "--bogus"], "No such option '--bogus'"),
    (["prune"], "Missing argument 'MODEL'"),
    (["stats", "merge", "--bogus"], "No such option '--bogus'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(cli, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0] and "--help" in lines[0]
