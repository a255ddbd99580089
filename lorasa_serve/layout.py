"""Row layout for a mixed-agent batch: group rows of one agent into fixed-size chunks.

A batch of B rows with slot ids `slots[B]` becomes `[C, M]` chunks (every chunk one agent, padded
with dead rows). The network then runs shared GEMMs over all C*M rows and per-chunk low-rank or
merged weights with `bmm`, instead of one gather of adapter matrices per row (slow) or one Python
loop per agent (slower). M is chosen per batch to trade padding against the number of chunks.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

CHUNK_COST_ROWS = 8  # one extra chunk costs about as much as this many padded rows
MAX_TILE = 4096  # rows per chunk at most, so big batches can run in cache-sized blocks of chunks


@dataclass(frozen=True)
class Layout:
    C: int  # chunks
    M: int  # rows per chunk
    chunk_slot: np.ndarray  # [C] int64: the agent slot of each chunk
    pos: np.ndarray | None  # [B] int64: padded position of each row; None = identity (B == C*M)

    @property
    def key(self) -> bytes:
        return self.M.to_bytes(8, "little") + self.chunk_slot.tobytes()


_CACHE: OrderedDict[bytes, Layout] = OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


def plan(slots: np.ndarray) -> Layout:
    """slots [B] int64 -> Layout, cached: an environment loop sends the same agent order every step."""
    key = slots.tobytes()
    with _CACHE_LOCK:
        lay = _CACHE.get(key)
        if lay is not None:
            _CACHE.move_to_end(key)
            return lay
    lay = plan_uncached(slots)
    with _CACHE_LOCK:
        _CACHE[key] = lay
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return lay


def plan_uncached(slots: np.ndarray) -> Layout:
    """slots [B] int64 -> Layout. Identity layouts (no copy) when rows are already grouped."""
    B = len(slots)
    counts = np.bincount(slots)
    present = np.flatnonzero(counts)
    n = len(present)
    if n == B:  # one row per agent (a team's decision step): each row its own chunk
        return Layout(B, 1, slots, None)
    c = counts[present]
    M = choose_tile(c)
    if B % M == 0 and c.min() >= M:  # rows may already be grouped in runs of M
        grid = slots.reshape(B // M, M)
        if (grid == grid[:, :1]).all():
            return Layout(B // M, M, np.ascontiguousarray(grid[:, 0]), None)
    order = np.argsort(slots, kind="stable")
    nch = -(-c // M)  # chunks per present agent
    chunk_slot = np.repeat(present, nch)
    base = np.repeat((np.cumsum(nch) - nch) * M, c)  # padded start of each sorted row's agent
    first = np.repeat(np.cumsum(c) - c, c)  # sorted index of each row's agent's first row
    pos = np.empty(B, dtype=np.int64)
    pos[order] = base + (np.arange(B) - first)
    return Layout(len(chunk_slot), M, chunk_slot, pos)


def choose_tile(counts: np.ndarray) -> int:
    """Rows per chunk minimising padded rows + CHUNK_COST_ROWS * chunks."""
    top = min(int(counts.max()), MAX_TILE)
    cands = {top, min(top, max(1, int(counts.sum()) // len(counts)))}
    p = 1
    while p < top:
        cands.add(p)
        p *= 2
    best, best_cost = top, None
    for m in sorted(cands):
        nch = -(-counts // m)
        cost = int((nch * m).sum()) + CHUNK_COST_ROWS * int(nch.sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = m, cost
    return best
