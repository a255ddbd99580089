"""When the Engine runs merged weights, and which agents' merged weights it keeps.

`auto_mode` is the cost rule of `mode="auto"`: merged weights (one bmm per layer, no low-rank
delta) when the stacked per-chunk weights are cheap to read per row and either small enough to
rebuild or reused from the per-layout cache; else the shared GEMM plus low-rank term.

`MergedSet` tracks the merged agents: pinned ones (`Engine.merge()`, never evicted) and those
`auto` merged on demand, kept in an LRU of at most `max_bytes` of merged weights
(`CacheLimits.auto_merged_bytes`). It decides; the Engine publishes the resulting bank under its
write lock. The thresholds below are the cost rule's, not cache bounds.
"""
from __future__ import annotations

import torch

from . import traced
from .bank import AdapterBank
from .caches import LRU
from .layout import Layout

MERGED_SMALL_BYTES = 2 << 20  # stacks up to this size: always merged (they stay in cache)
MERGED_MAX_BYTES = 64 << 20  # never stack more than this per forward
MERGED_MAX_BYTES_PER_ROW = 1 << 10  # weight bytes read per row; beyond it the low-rank path wins
SMALL_LORA_MIN_CHUNKS = 8  # see auto_mode


def auto_mode(bank: AdapterBank, lay: Layout, rows: int, device: torch.device) -> str:
    """"merged" or "lora" for a forward of `rows` rows planned as `lay` (one agent per chunk)."""
    stack = lay.C * bank.merged_bytes_per_agent
    if stack <= MERGED_SMALL_BYTES:
        # tiny batches of >= 8 chunks on one CPU thread: the per-chunk merged GEMVs cannot
        # run in parallel and the (traced) shared GEMM + low-rank term is faster (measured:
        # 8 agents x 1 row 1.35x PS vs 1.54x merged; with <= 6 chunks merged wins)
        if (rows <= traced.TRACE_MAX_ROWS and lay.C >= SMALL_LORA_MIN_CHUNKS
                and device.type == "cpu" and torch.get_num_threads() == 1):
            return "lora"
        return "merged"
    if stack <= MERGED_MAX_BYTES and stack / rows <= MERGED_MAX_BYTES_PER_ROW \
            and bank.cache.count_seen(lay.key) >= 2:
        return "merged"
    return "lora"


class MergedSet:
    """Pinned and auto-merged slots. Not thread-safe: the Engine calls it under its write lock."""

    def __init__(self, max_bytes: int):
        self.pinned: set[int] = set()  # merged by `Engine.merge()`: never evicted
        self.lru: LRU[int, None] = LRU(max_bytes=max_bytes)  # merged by auto, sized in merged bytes
        self.last_key: bytes | None = None  # layout whose slots were touched last

    def pin(self, slots: list[int], merge: bool) -> None:
        for s in slots:
            self.lru.pop(s)
            (self.pinned.add if merge else self.pinned.discard)(s)

    def touch(self, lay: Layout) -> None:
        """Mark the layout's slots most recently used (an env loop repeats its layout: once)."""
        self.last_key = lay.key
        for s in lay.slot_set:
            self.lru.touch(s)

    def admit(self, slots: list[int], nbytes: int) -> None:
        """Track `slots` (merged weights of `nbytes` each) as the most recently used (eviction waits
        for `evictions`)."""
        for s in slots:
            if s not in self.pinned:
                self.lru.add(s, None, nbytes)

    def evictions(self, bank: AdapterBank, need: set[int]) -> list[int]:
        """Least recently used auto-merged slots beyond the byte budget (never those in `need`)."""
        for s in [s for s in bank.merged if s not in self.pinned and s not in self.lru]:
            # merged but untracked (e.g. after a concurrent writer): track it as the oldest
            self.lru.put_oldest(s, None, bank.merged_bytes_per_agent)
        return [s for s, _ in self.lru.evict(keep=need)]
