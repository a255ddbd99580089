"""Row layout for a mixed-agent batch: group rows of one agent into fixed-size chunks.

A batch of B rows with slot ids `slots[B]` becomes `[C, M]` chunks. The network then runs shared
GEMMs over all C*M rows and per-chunk low-rank or merged weights with `bmm`, instead of one gather
of adapter matrices per row (slow) or one Python loop per agent (slower).

Two kinds of plan (`plan`; the Engine's `Planner` caches them, since an environment loop sends the
same agent order every step):
- `plan(slots)`: every chunk holds one agent (each agent's rows padded to a multiple of M with dead
  rows). Needed by merged weights (one weight matrix per chunk). M trades padding against chunks.
- `plan(slots, mixed=True)`: rows sorted by agent and cut into windows of M rows without per-agent
  padding, so a chunk may hold up to P agents. The low-rank term then uses the chunk's P adapters
  side by side (`[in, P*r]`) and a 0/1 mask keeps each row's own agent's block: P times the
  low-rank work, but no padded rows through the whole network. Chosen per batch by a cost model
  (it falls back to one-agent chunks, P = 1, when that is cheaper).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from .caches import LRU

CHUNK_COST_ROWS = 8  # one extra chunk costs about as much as this many padded rows
MAX_TILE = 4096  # rows per chunk at most, so big batches can run in cache-sized blocks of chunks


# mixed plans: cost of a layout in units of one row's low-rank work (all layers, one adapter)
# (fitted on a 2-core CPU, hidden 64, rank 8: one chunk costs about as much as 6 rows' shared forward)
ROW_COST = 5.0  # one row through the whole shared network
LOWRANK_COST = 0.4  # one row's low-rank term with one adapter block
CHUNK_COST = 25.0  # one chunk: its small bmm calls
ADAPTER_COST = 2.0  # reading one agent's stacked adapter for one chunk
MAX_MIXED_TILE = 256  # rows per chunk at most in a mixed plan


@dataclass(frozen=True)
class Layout:
    C: int  # chunks
    M: int  # rows per chunk
    chunk_slots: np.ndarray  # [C, P] int64: the agent slots of each chunk (P = 1: one agent)
    pos: np.ndarray | None  # [B] int64: padded position of each row; None = identity (B == C*M)
    row_block: np.ndarray | None = None  # [C, M] int64: which of its chunk's P agents each row
    # uses (-1: dead row); None when P == 1

    @property
    def P(self) -> int:
        return self.chunk_slots.shape[1]

    @property
    def chunk_slot(self) -> np.ndarray:
        """[C] the agent of each chunk (one-agent plans only)."""
        assert self.P == 1, "chunk_slot needs a one-agent-per-chunk plan"
        return self.chunk_slots[:, 0]

    @cached_property
    def src(self) -> np.ndarray | None:
        """[C*M] int64: the caller row at each padded position, None = identity. Dead rows read
        row 0 (any valid row: rows never mix, and their outputs are dropped)."""
        if self.pos is None:
            return None
        out = np.zeros(self.C * self.M, dtype=np.int64)
        out[self.pos] = np.arange(len(self.pos))
        return out

    @cached_property
    def rows(self) -> np.ndarray:
        """[B] int64: the agent slot of each caller row (the `slots` the plan was made from)."""
        if self.row_block is None:  # one agent per chunk
            padded = np.repeat(self.chunk_slots[:, 0], self.M)  # [C*M]
        else:  # row m of chunk c uses block row_block[c, m] of its chunk's P agents (dead rows: -1)
            padded = np.take_along_axis(self.chunk_slots, np.maximum(self.row_block, 0), 1).reshape(-1)
        return padded if self.pos is None else padded[self.pos]

    def index_tensors(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(pos, src) as int64 tensors on `device` (see `on_device`)."""
        return self.on_device("pos", device), self.on_device("src", device)

    def on_device(self, name: str, device: torch.device) -> Tensor | None:
        """One of the plan's index arrays ("pos", "src", "rows", "chunk_slots", "row_block") as an
        int64 tensor on `device`, made once per plan and device: an environment loop, which repeats
        its agent order, never copies indices to a GPU again (a copy per call would be a host
        synchronisation in the middle of the forward)."""
        key = (name, device)
        if key not in self._on_device:  # two threads may both build it: the same values either way
            a = getattr(self, name)
            # non_blocking: a copy from (pageable) host memory that does not wait for queued GPU work
            self._on_device[key] = None if a is None else \
                torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
        return self._on_device[key]

    @cached_property
    def _on_device(self) -> dict:
        return {}

    @cached_property
    def slot_set(self) -> frozenset[int]:
        """The agent slots present."""
        return frozenset(self.chunk_slots.reshape(-1).tolist())

    @cached_property
    def key(self) -> bytes:
        """Identifies the per-chunk parameters this plan needs (same key: same tensors)."""
        rb = b"" if self.row_block is None else self.row_block.tobytes()
        return (self.M.to_bytes(8, "little") + self.P.to_bytes(8, "little")
                + self.chunk_slots.tobytes() + rb)


class Planner:
    """Plans row layouts and keeps the last `max_entries` (LRU by the batch's agent order). Thread-safe."""

    def __init__(self, max_entries: int):
        self._plans: LRU[tuple[bytes, bool], Layout] = LRU(max_entries)
        self._lock = threading.Lock()

    def plan(self, slots: np.ndarray, mixed: bool = False) -> Layout:
        """`plan(slots, mixed)`, cached."""
        key = (slots.tobytes(), mixed)
        with self._lock:
            lay = self._plans.get(key)
        if lay is not None:
            return lay
        lay = plan_mixed(slots, self.plan(slots)) if mixed else plan_single(slots)
        with self._lock:
            self._plans.put(key, lay)
        return lay


def plan(slots: np.ndarray, mixed: bool = False) -> Layout:
    """slots [B] int64 -> Layout (uncached: `Planner` caches).

    `mixed` allows chunks holding several agents (low-rank path only, see the module docstring)."""
    single = plan_single(slots)
    return plan_mixed(slots, single) if mixed else single


def plan_single(slots: np.ndarray) -> Layout:
    """slots [B] int64 -> Layout with one agent per chunk. Identity layouts (no copy) when rows are
    already grouped."""
    B = len(slots)
    counts = np.bincount(slots)
    present = np.flatnonzero(counts)
    n = len(present)
    if n == B:  # one row per agent (a team's decision step): each row its own chunk
        return Layout(B, 1, slots[:, None], None)
    c = counts[present]
    M = choose_tile(c)
    if B % M == 0 and c.min() >= M:  # rows may already be grouped in runs of M
        grid = slots.reshape(B // M, M)
        if (grid == grid[:, :1]).all():
            return Layout(B // M, M, np.ascontiguousarray(grid[:, :1]), None)
    order = np.argsort(slots, kind="stable")
    nch = -(-c // M)  # chunks per present agent
    chunk_slot = np.repeat(present, nch)
    base = np.repeat((np.cumsum(nch) - nch) * M, c)  # padded start of each sorted row's agent
    first = np.repeat(np.cumsum(c) - c, c)  # sorted index of each row's agent's first row
    pos = np.empty(B, dtype=np.int64)
    pos[order] = base + (np.arange(B) - first)
    return Layout(len(chunk_slot), M, chunk_slot[:, None], pos)


def plan_mixed(slots: np.ndarray, single: Layout) -> Layout:
    """slots [B] int64, `single` (its one-agent-per-chunk plan) -> the cheapest (by `plan_cost`) of it
    and the mixed plans with M = 2, 4, ... MAX_MIXED_TILE rows per chunk."""
    if single.C == len(slots):  # one row per agent: 1-row chunks are cheapest (measured)
        return single
    best, best_cost = single, plan_cost(single)
    for lay in mixed_candidates(slots):
        c = plan_cost(lay)
        if c < best_cost:
            best, best_cost = lay, c
    return best


def mixed_candidates(slots: np.ndarray) -> list[Layout]:
    """Mixed plans for M = 2, 4, ... MAX_MIXED_TILE: rows sorted by agent, windows of M rows."""
    order = np.argsort(slots, kind="stable")
    pos = np.empty(len(slots), dtype=np.int64)
    pos[order] = np.arange(len(slots))
    sorted_slots = slots[order]
    out, M = [], 2
    while M <= min(MAX_MIXED_TILE, len(slots)):
        out.append(mixed_layout(sorted_slots, pos, M))
        M *= 2
    return out


def mixed_layout(sorted_slots: np.ndarray, pos: np.ndarray, M: int) -> Layout:
    """sorted_slots [B] (rows sorted by agent), pos [B] (sorted position of each caller row) -> plan
    with chunks of M consecutive sorted rows; the dead tail rows of the last chunk use block -1."""
    B = len(sorted_slots)
    C = -(-B // M)
    grid = np.concatenate([sorted_slots, np.full(C * M - B, sorted_slots[-1])]).reshape(C, M)
    block = np.zeros((C, M), dtype=np.int64)  # [C, M] index of each row's agent within its chunk
    np.cumsum(grid[:, 1:] != grid[:, :-1], axis=1, out=block[:, 1:])
    P = int(block.max()) + 1
    chunk_slots = np.repeat(grid[:, -1:], P, axis=1)  # unused blocks: any valid slot (masked out)
    chunk_slots[np.repeat(np.arange(C), M), block.reshape(-1)] = grid.reshape(-1)
    block.reshape(-1)[B:] = -1
    identity = C * M == B and bool((pos == np.arange(B)).all())  # no dead rows, already sorted
    return Layout(C, M, chunk_slots, None if identity else pos, block)


def plan_cost(lay: Layout) -> float:
    """Relative cost of a plan: every (padded) row through the shared network and its P-block
    low-rank term, plus per chunk the small-bmm overhead and reading its P stacked adapters."""
    return (lay.C * lay.M * (ROW_COST + LOWRANK_COST * lay.P)
            + lay.C * (CHUNK_COST + ADAPTER_COST * lay.P))


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
