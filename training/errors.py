"""Training's own runtime error. User errors of the training CLIs are `lorasa_serve.cli.UsageError`
(one line, exit 2, printed by `lorasa_serve.cli.run_cli` like every other command's)."""
from __future__ import annotations


class WorkerLostError(RuntimeError):
    """A remote rollout worker (its process or node) died mid-run: the message names it and says what was
    kept (nothing of the failed update) and how to continue (resume from the last checkpoint)."""
