"""Session steps at the LORASA_MAX_SESSIONS bound on the local state backend (issue 25, item 6).

    PYTHONPATH=. python benchmarks/session_eviction.py [--sessions 20000] [--steps 300]

Fills the bound with sessions, then times steps of new sessions (open_steps + close_steps, each
evicting the least recently used one) and of an existing one: median and p95 in ms. Not a test.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.timing import percentile
from lorasa_serve.cli import ArgumentParser, run_cli
from services.state import SessionLimits
from services.state.local_backend import LocalState


def _step(st: LocalState, sid: str, h: np.ndarray) -> float:
    t0 = time.perf_counter()
    step = st.open_steps([(sid, ["a0", "a1"])])[0]
    st.close_steps([(step, h)])
    return (time.perf_counter() - t0) * 1e3


PROG = "python -m benchmarks.session_eviction"


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20_000, help="sessions held (the eviction bound)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per case")
    return ap


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    h = np.zeros((2, 64), np.float32)
    with tempfile.TemporaryDirectory() as d:
        st = LocalState(d, "f" * 64, 64, SessionLimits(max_sessions=args.sessions))
        t0 = time.perf_counter()
        below = [_step(st, f"fill-{i}", h) for i in range(args.sessions)]
        fill_s = time.perf_counter() - t0
        new = [_step(st, f"new-{i}", h) for i in range(args.steps)]  # each evicts one
        same = [_step(st, "new-0", h) for _ in range(args.steps)]
        stats = st.session_stats()
    q = lambda xs: f"median {statistics.median(xs):.3f} ms, p95 {percentile(xs, 95):.3f} ms"  # noqa: E731
    print(f"fill {args.sessions} sessions: {fill_s:.1f} s (last 300 steps below the bound: {q(below[-300:])})")
    print(f"new session at the bound (evicts one): {q(new)}")
    print(f"existing session at the bound:         {q(same)}")
    print(f"sessions held: {stats['sessions']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
