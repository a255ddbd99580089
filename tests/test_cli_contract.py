"""The command-line contract (lorasa_serve/cli.py) for EVERY entry point: each console script of
pyproject.toml [project.scripts] and each `python -m` module of the installed packages (found by its
`if __name__ == "__main__"` guard or its package's __main__.py, so a new one is covered without editing
this file). For each: `parser()` is `lorasa_serve.cli.ArgumentParser` with help on every option and
sub-command and its default in --help; `--help` exits 0; an unknown flag and an abbreviated flag each
give exactly one stderr line `<prog>: error: ...` and exit status 2; `python -m` passes main()'s status
to the shell. The console scripts also run as real processes."""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lorasa_serve.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lorasa_serve", "training", "exporters", "services", "benchmarks")
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]  # name -> "mod:main"


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _module_entry_points() -> dict[str, Path]:
    """`python -m` module name -> the file holding its `__main__` guard."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if not any(_is_main_guard(n) for n in tree.body):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__main__" else parts)] = path
    return found


MODULES = _module_entry_points()
ENTRY_MODULES = sorted(set(MODULES) | {target.split(":")[0] for target in SCRIPTS.values()})


def test_the_entry_points_are_found():
    """The discovery above is not empty-handed: every console script's module and the benchmarks."""
    assert {"training.cli", "exporters.cli", "benchmarks.engine", "services.model_store", "training.report",
            "benchmarks.load_bench", "benchmarks.session_eviction"} <= set(ENTRY_MODULES)
    assert all(target.endswith(":main") for target in SCRIPTS.values())


def _load(name: str):
    """The module, or a skip naming the optional third-party package it needs."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in PACKAGES:
            raise
        pytest.skip(f"{name} needs {e.name}, not installed here")


def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(sub-command path, parser) for `p` and each sub-command's parser, depth first."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, (*path, name))


def _minimal_argv(p: argparse.ArgumentParser) -> tuple[list[str], argparse.ArgumentParser]:
    """Arguments that satisfy every required positional and option (down the first sub-command), so
    that what follows them is judged as a flag -> (argv, the parser that reads the flags at the end)."""
    argv: list[str] = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            name, sub = next(iter(a.choices.items()))
            rest, last = _minimal_argv(sub)
            return argv + [name] + rest, last
        if not a.option_strings:
            argv.append("x")
        elif a.required:
            argv += [a.option_strings[-1], "x"]
    return argv, p


def _one_error_line(capsys, prog: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_every_option_has_help_and_shows_its_default(name):
    mod = _load(name)
    top = mod.parser()
    assert isinstance(top, ArgumentParser), f"{name}: build the parser with lorasa_serve.cli.ArgumentParser"
    for path, p in _parsers(top):
        assert p.allow_abbrev is False, (name, path)
        formatter = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            what = (name, path, a.option_strings or a.dest)
            assert a.help and a.help is not argparse.SUPPRESS and a.help.strip(), f"no help: {what}"
            d = a.default  # None, False, "": unset (the help says what that means); SUPPRESS: lorasa-train's
            if a.option_strings and not (d is None or d is False or d in ("", ())):
                assert "default" in formatter._expand_help(a), f"--help does not show the default: {what}"


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_help_exits_0(name, capsys):
    mod = _load(name)
    for path, _ in _parsers(mod.parser()):
        with pytest.raises(SystemExit) as e:
            mod.main([*path, "--help"])
        assert e.value.code == 0, (name, path)
        assert capsys.readouterr().out.startswith("usage: "), (name, path)


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_an_unknown_flag_is_one_line_and_exit_2(name, capsys):
    mod = _load(name)
    top = mod.parser()
    argv, _ = _minimal_argv(top)
    capsys.readouterr()
    assert mod.main([*argv, "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in _one_error_line(capsys, top.prog)


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_an_abbreviated_flag_is_one_line_and_exit_2(name, capsys):
    """The longest flag cut by one character: a unique prefix, which argparse would take by default."""
    mod = _load(name)
    top = mod.parser()
    argv, reader = _minimal_argv(top)
    flags = [s for a in reader._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    if not flags:
        pytest.skip(f"{name} has no long flags")
    abbrev = max(flags, key=len)[:-1]
    assert [f for f in flags if f.startswith(abbrev)] == [max(flags, key=len)]
    capsys.readouterr()
    assert mod.main([*argv, abbrev]) == 2
    assert f"unrecognized arguments: {abbrev}" in _one_error_line(capsys, top.prog)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_python_m_passes_mains_status_to_the_shell(name):
    """The guard is `sys.exit(main())` (or `raise SystemExit(main())`): a returned 2 reaches the shell."""
    guard = next(n for n in ast.parse(MODULES[name].read_text()).body if _is_main_guard(n))
    assert len(guard.body) == 1, ast.unparse(guard)
    assert ast.unparse(guard.body[0]) in ("sys.exit(main())", "raise SystemExit(main())"), ast.unparse(guard)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_unknown_flag(script):
    """The installed console script (or, without it, the same `main` via python -c), as a process."""
    module = SCRIPTS[script].split(":")[0]
    _load(module)
    exe = Path(sys.executable).with_name(script)
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", f"import sys; from {module} import main; "
                                                                 "sys.exit(main())"]
    argv, _ = _minimal_argv(importlib.import_module(module).parser())
    r = subprocess.run(cmd + argv + ["--no-such-flag"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: unrecognized arguments: --no-such-flag"), \
        r.stderr


def test_a_usage_error_and_ctrl_c(capsys):
    """run_cli: a UsageError raised by the command is one line and 2; KeyboardInterrupt is 130, quietly;
    any other exception is a programming error and propagates with its traceback."""
    from lorasa_serve.cli import UsageError, run_cli

    def fails(argv):
        raise UsageError("--out x is a file:\n  pass a directory")

    def interrupted(argv):
        raise KeyboardInterrupt

    def broken(argv):
        raise ZeroDivisionError

    assert run_cli("prog", fails, []) == 2
    assert capsys.readouterr().err == "prog: error: --out x is a file: pass a directory\n"
    assert run_cli("prog", interrupted, []) == 130
    assert capsys.readouterr().err == ""
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", broken, [])


def test_abbreviations_cannot_be_turned_back_on():
    with pytest.raises(ValueError, match="whole flags"):
        ArgumentParser(prog="x", allow_abbrev=True)
