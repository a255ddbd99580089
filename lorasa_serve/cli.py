"""What every `lorasa-*` command does with a user error: one line on stderr naming the fix, exit 2.

    def main(argv=None) -> int:
        return run_cli("lorasa-export", run, argv)    # run(argv) -> exit status

`run` raises `UsageError` (or any `LorasaError`: a bad policy file, bad input) for a mistake the
user can fix; it must raise before writing anything, or write atomically. Argument parsing errors
from `ArgumentParser` (the one-line subclass below) take the same path.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from .errors import LorasaError


class UsageError(LorasaError):
    """A command-line mistake; the message says how to fix it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a parsing error raises UsageError (one line) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")  # as training.errors.OneLineParser


def run_cli(prog: str, run: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except LorasaError as e:
        print(f"{prog}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())
