"""The one command-line contract of every `lorasa-*` command and `python -m` entry point.

    def parser() -> ArgumentParser: ...              # every flag with help; --help shows the defaults
    def run(argv: list[str] | None) -> int: ...       # parses, checks, works; returns the exit status
    def main(argv: list[str] | None = None) -> int:
        return run_cli("lorasa-export", run, argv)

    if __name__ == "__main__":
        sys.exit(main())

A mistake the user can fix raises `UsageError` (or any typed `LorasaError`: a bad policy file, bad
input, a missing environment package), before anything is written or atomically; `run_cli` prints it
as ONE line, `<prog>: error: <message>`, on stderr and returns exit status 2. Argument parsing errors
of `ArgumentParser` (unknown or abbreviated flag, bad value) take the same path, with a did-you-mean
for a misspelt flag. Ctrl-C returns 130 without a traceback. Anything else is a programming error and
keeps its traceback. `tests/test_cli_contract.py` checks this for every entry point.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Callable, NoReturn

from .errors import LorasaError

EXIT_USAGE = 2  # a user error: one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


class UsageError(LorasaError):
    """A command-line mistake: the message is one line saying what is wrong and what to do instead."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its examples keep their lines); each option's help ends with its
    default, unless the help already names one or there is none to show (None, False, SUPPRESS)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        shown = not (d is None or d is False or d is argparse.SUPPRESS or d in ("", ()))  # 0 is shown
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with abbreviations off (`--thread` is not `--threads`), defaults shown in --help, and a
    parse error raised as a one-line `UsageError` naming the fix instead of printing the usage."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("allow_abbrev"):
            raise ValueError("lorasa commands take whole flags only: drop allow_abbrev")
        kwargs["allow_abbrev"] = False  # sub-commands (add_subparsers) get this class and this too
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}{self._hint(message)}; see {self.prog} --help")

    def _hint(self, message: str) -> str:
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if not m:
            return ""
        flag = m.group(1).split("=", 1)[0]
        known = [s for a in self._actions for s in a.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
        return f" (did you mean {close[0]}?)" if close else ""


def one_line(text: object, limit: int = 600) -> str:
    """`text` on one line (newlines folded), cut to `limit` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def print_error(prog: str, message: object) -> None:
    """`<prog>: error: <message>` as one line on stderr."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


def run_cli(prog: str, run: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """`run(argv)`'s exit status; a UsageError or other LorasaError: one stderr line and 2; Ctrl-C: 130."""
    try:
        return run(argv)
    except LorasaError as e:
        print_error(prog, e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
