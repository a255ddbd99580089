"""User errors of the training CLIs (`lorasa-train`, `lorasa-eval`, `lorasa-report`).

A `UsageError` is a mistake the user can fix (a missing directory, a flag that does not fit the run); its
message is one line that names the fix. Library code raises it; each CLI's `main()` catches it once via
`exit_on_usage_error` and prints `<prog>: error: <message>` on stderr with exit status 2. Anything else is
a programming error and keeps its traceback. `OneLineParser` makes argparse's own errors (unknown flag,
bad value, unknown choice) the same one line, with a did-you-mean for misspelt flags.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import sys
from collections.abc import Iterator

from lorasa_serve.errors import LorasaError

from .envs import EnvUnavailableError, UnknownTaskError

EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake: the message is one line saying what is wrong and what to do instead."""


def one_line(text: object, limit: int = 600) -> str:
    """`text` on one line (newlines folded), cut to `limit` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def fail(prog: str, message: object) -> None:
    """Print the one-line error and exit with status 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


@contextlib.contextmanager
def exit_on_usage_error(prog: str) -> Iterator[None]:
    """The one place each CLI turns user errors into one stderr line + exit 2. Artifact errors from
    `lorasa_serve` (a corrupt or mismatched policy file) and a missing environment package count as
    user errors too: their messages already name the file / the install command."""
    try:
        yield
    except (UsageError, LorasaError, EnvUnavailableError, UnknownTaskError) as e:
        fail(prog, e)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a parse error is one line naming the fix (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        fail(self.prog, f"{message}{self._hint(message)}; see {self.prog} --help")

    def _hint(self, message: str) -> str:
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if not m:
            return ""
        flag = m.group(1).split("=", 1)[0]
        known = [s for a in self._actions for s in a.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""


class WorkerLostError(RuntimeError):
    """A remote rollout worker (its process or node) died mid-run: the message names it and says what was
    kept (nothing of the failed update) and how to continue (resume from the last checkpoint)."""
