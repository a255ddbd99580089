"""Traced forwards for small fixed-shape batches (a team's decision step).

A forward over a handful of rows is dominated by Python and per-op dispatch (~40 small ops), not
by arithmetic. `TraceCache` records the forward once with `torch.jit.trace` (parameters become
constants of the graph) and replays it without Python. It is lazy and safe:
- a key (mode, layout, input shapes) is traced on its second use, so one-off shapes stay eager;
- the traced graph is checked against the eager result of the same call before it is used;
- any failure (tracing unsupported, a mismatch, a future torch without `torch.jit`) marks the key
  as eager for good. Device-agnostic: the same trace runs on CPU and CUDA tensors.
Each bank owns one `TraceCache` (`CacheLimits.traced_graphs` entries; 0 turns tracing off).
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch
from torch import Tensor

from .caches import LRU

TRACE_MAX_ROWS = 64  # batches up to this many rows are traced (bigger ones are arithmetic-bound)
_EAGER = "eager"  # marker: this key stays eager (tracing failed or did not match)

Forward = Callable[..., tuple[Tensor, Tensor | None]]


class TraceCache:
    """Bounded LRU of traced forwards, keyed by anything hashable that fixes shapes and weights.
    `max_entries` 0: every forward runs eager."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: LRU[object, object] = LRU(max_entries)  # key -> 1 (seen) | fn | _EAGER
        self._lock = threading.Lock()

    def run(self, key: object, forward: Forward, args: tuple[Tensor | None, ...]
            ) -> tuple[Tensor, Tensor | None]:
        """forward(*args), traced from the second call with this key on. `None` args are allowed
        (they are fixed by the key: the trace sees only the tensors)."""
        if not self.max_entries:
            return forward(*args)
        with self._lock:
            entry = self._entries.get(key)  # now the most recently used
            if entry is None:
                self._entries.put(key, 1)
        if callable(entry):
            return entry(*args)
        out = forward(*args)
        if entry == 1:  # second sighting: trace now (the eager result is returned either way)
            fn = _trace(forward, args, out)
            with self._lock:
                self._entries.put(key, _EAGER if fn is None else fn)
        return out

    def drop(self, prefix: tuple) -> None:
        """Forget the traces whose key starts with `prefix` (their graphs hold the weights of a
        layout the caller no longer caches)."""
        n = len(prefix)
        with self._lock:
            for key in [k for k in self._entries if isinstance(k, tuple) and k[:n] == prefix]:
                self._entries.pop(key)


def _trace(forward: Forward, args: tuple[Tensor | None, ...],
           expected: tuple[Tensor, Tensor | None]) -> Forward | None:
    """A traced forward equal to `forward` on `args` (checked against `expected`), or None."""
    present = [i for i, a in enumerate(args) if a is not None]

    def tensors_only(*ts: Tensor) -> tuple[Tensor, ...]:
        full: list[Tensor | None] = [None] * len(args)
        for i, t in zip(present, ts):
            full[i] = t
        head, h = forward(*full)
        return (head,) if h is None else (head, h)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; we fall back if gone
            traced = torch.jit.trace(tensors_only, tuple(args[i] for i in present),
                                     check_trace=False)
            # the executor may re-optimise after its first runs: check a few of them
            runs = [traced(*(args[i] for i in present)) for _ in range(3)]
    except Exception:  # noqa: BLE001 - any tracing problem means: stay eager
        return None
    want = [t for t in expected if t is not None]
    # allclose reads back (on a GPU a synchronisation): once per key, when it is traced, never per call
    for got in runs:
        if len(got) != len(want) or not all(
                g.shape == w.shape and torch.allclose(g, w, rtol=0.0, atol=1e-6)
                for g, w in zip(got, want)):
            return None

    def run(*a: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out = traced(*(a[i] for i in present))
        return out[0], (out[1] if len(out) > 1 else None)
    return run
