"""What the Engine's caches may hold (`CacheLimits`) and the one bounded map they are built on (`LRU`).

Every cache belongs to the object that uses it, none is a module global:

| cache                                   | owner                            | bounded by                 |
|-----------------------------------------|----------------------------------|----------------------------|
| row layouts by agent order              | Engine (`layout.Planner`)        | `plans`                    |
| assembled parameters per (mode, layout) | each bank (`bank.BankCache`)     | `params`, `params_bytes`   |
| plan counts per layout (mode auto)      | each bank (`bank.BankCache`)     | `seen_layouts`             |
| traced forwards of small batches        | each bank (`traced.TraceCache`)  | `traced_graphs` (0: off)   |
| agents merged on demand (mode auto)     | Engine (`merge_policy.MergedSet`)| `auto_merged_bytes`        |
| recurrent state of `act_session`        | Engine (`sessions.SessionStore`) | `sessions`, `session_bytes`, `session_ttl_s` |

A new bank (hot swap, merge) starts with empty caches of its own, bounded by the same limits.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Collection, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CacheLimits:
    """Bounds of every Engine cache: `Engine(..., limits=CacheLimits(...))`, `Engine.from_dir(...)` alike.
    Each field's help text is in `CacheLimits.help()`."""

    plans: int = _limit(16, "row layouts kept per Engine, keyed by the batch's agent order (an "
                            "environment loop sends the same order every step)")
    params: int = _limit(4, "assembled per-layout parameters kept per adapter bank")
    params_bytes: int = _limit(256 << 20, "bytes of per-layout copies (gathered adapters, masks, stacked "
                                          "merged weights) those may hold; the newest entry is always kept")
    seen_layouts: int = _limit(64, "layouts whose plan counts mode auto keeps per bank (a layout planned "
                                   "twice may get merged weights)")
    traced_graphs: int = _limit(16, "traced forwards of small batches kept per bank; 0: never trace")
    auto_merged_bytes: int = _limit(64 << 20, "bytes of merged weights of the agents mode auto merged on "
                                              "demand (least recently used evicted; merge() pins are not "
                                              "counted)")
    sessions: int = _limit(10_000, "sessions whose recurrent state Engine.act_session keeps")
    session_bytes: int = _limit(256 << 20, "bytes of recurrent state those may hold")
    session_ttl_s: float | None = _limit(None, "a session untouched this long is forgotten; None: never")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "session_ttl_s":
                if v is not None and not (isinstance(v, (int, float)) and v > 0):
                    raise ValueError(f"CacheLimits.session_ttl_s must be > 0 or None, not {v!r}")
                continue
            low = 0 if f.name == "traced_graphs" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"CacheLimits.{f.name} must be an int >= {low}, not {v!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> what it bounds."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


class LRU(Generic[K, V]):
    """A map that forgets its least recently used entries while it holds more than `max_entries`
    entries or more than `max_bytes` bytes (each entry's size as given to `put`; None: unbounded).
    The entry just put is never evicted, nor any key in `put`'s `keep`.

    Not thread-safe: its owner calls it under its own lock (or from one thread)."""

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[K, V] = OrderedDict()  # least recently used first
        self._sizes: dict[K, int] = {}
        self.nbytes = 0  # sum of the sizes of the entries held

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first (a snapshot: the map may change while iterating)."""
        return iter(list(self._items))

    def keys(self) -> list[K]:
        return list(self._items)

    def values(self) -> list[V]:
        return list(self._items.values())

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value (now the most recently used), or `default`."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def touch(self, key: K) -> None:
        """Mark `key` most recently used (if held)."""
        if key in self._items:
            self._items.move_to_end(key)

    def put(self, key: K, value: V, nbytes: int = 0, keep: Collection[K] = ()) -> list[tuple[K, V]]:
        """Store `value` as the most recently used; evict past a bound -> the evicted (key, value)s,
        least recently used first."""
        self.add(key, value, nbytes)
        return self.evict(keep=(key, *keep))

    def add(self, key: K, value: V, nbytes: int = 0) -> None:
        """Store `value` as the most recently used, evicting nothing (until `put` or `evict`)."""
        self._set(key, value, nbytes)
        self._items.move_to_end(key)

    def put_oldest(self, key: K, value: V, nbytes: int = 0) -> None:
        """Store `value` as the least recently used (the first to go), evicting nothing."""
        self._set(key, value, nbytes)
        self._items.move_to_end(key, last=False)

    def pop(self, key: K, default: V | None = None) -> V | None:
        if key not in self._items:
            return default
        self.nbytes -= self._sizes.pop(key)
        return self._items.pop(key)

    def oldest(self) -> K | None:
        """The least recently used key (None when empty)."""
        return next(iter(self._items), None)

    def evict(self, keep: Collection[K] = ()) -> list[tuple[K, V]]:
        """Drop least recently used entries not in `keep` while over a bound -> the dropped ones."""
        out: list[tuple[K, V]] = []
        while self._over():
            victim = next((k for k in self._items if k not in keep), None)
            if victim is None:
                break
            out.append((victim, self.pop(victim)))
        return out

    def _over(self) -> bool:
        return ((self.max_entries is not None and len(self._items) > self.max_entries)
                or (self.max_bytes is not None and self.nbytes > self.max_bytes))

    def _set(self, key: K, value: V, nbytes: int) -> None:
        self.nbytes += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        self._items[key] = value
