"""The one timing helper of every benchmark: methods measured side by side, interleaved.

Timing one method after another lets a change in machine load (a shared CI box, a laptop that
throttles) favour whichever ran in the quiet part. Every function here runs the methods in turn
within each round, so load changes hit all of them alike, and reports medians and ratios per round.
Pure standard library (callers pass a `sync`, e.g. `torch.cuda.synchronize`), so the HTTP load
benchmark (`benchmarks/load_bench.py`) can use it too.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

Call = Callable[[], object]


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class Timed:
    seconds: float  # median seconds per call over the rounds
    ratio: float  # median over rounds of (this method's time / the first method's time)
    calls: int  # calls timed (warm-up excluded)


def time_interleaved(calls: Mapping[str, Call], min_time: float, rounds: int = 7,
                     sync: Callable[[], None] = _no_sync) -> dict[str, Timed]:
    """Time each call in `rounds` interleaved blocks sized to about `min_time` seconds per method.

    The first method is the baseline of `ratio`. Each method is warmed up twice, then timed once
    to size its blocks (fast calls are repeated within a block so the timer resolution is moot)."""
    per_block: dict[str, int] = {}
    for name, fn in calls.items():
        for _ in range(2):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        per_block[name] = max(1, int(min_time / rounds / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(per_block[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / per_block[name])
    return _summarise(samples, {n: rounds * k for n, k in per_block.items()})


def time_round_robin(calls: Mapping[str, Call], repeats: int, warmup: int = 3,
                     sync: Callable[[], None] = _no_sync) -> dict[str, Timed]:
    """One call of each method per round, `repeats` rounds after `warmup` dropped ones (for calls
    slow enough to time one by one)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return _summarise(samples, {n: repeats for n in calls})


def latencies_alternating(calls: Mapping[str, Call], n: int, warmup: int = 50) -> dict[str, list[float]]:
    """Per-call latencies (seconds) of `n` calls of each method, alternating call by call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + n):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank rule on the sorted values (a list or array)."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))])


def _summarise(samples: dict[str, list[float]], calls: dict[str, int]) -> dict[str, Timed]:
    base = samples[next(iter(samples))]
    return {name: Timed(statistics.median(s), statistics.median(a / b for a, b in zip(s, base)), calls[name])
            for name, s in samples.items()}
