"""A dict whose entries live for a fixed time and never number more than a cap: the endpoint's memory bound.

Entries are ``(expires_at, value)`` pairs and the expiry queues hold ``(expires_at, key)`` pairs, so when the
values are bytes (an answered exchange keeps only its reply) every long-lived object is a tuple of atoms that
CPython's cyclic GC stops tracking. Under load that keeps full collections cheap however many entries are
kept — a map of live objects would make every gen-2 collection walk the whole de-duplication history.

There is one queue per lifetime: with a non-decreasing ``now`` each queue is in expiry order by construction,
whereas one shared queue would let a long-lived entry hide a shorter-lived one inserted after it (a NON's
145 s behind a CON's 247 s). Callers use a few fixed lifetimes, so there are a few queues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: dict[K, tuple[float, V]] = {}
        self._queues: dict[float, deque[tuple[float, K]]] = {}  # lifetime -> (expires_at, key), oldest first
        self._queued = 0  # entries in all queues, stale ones (overwritten or popped keys) included

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        entry = self._items.pop(key, None)
        return None if entry is None else entry[1]

    def put(self, key: K, value: V, now: float, lifetime: float) -> None:
        """Insert (or overwrite) for ``lifetime`` seconds from ``now``; at the cap the first to expire goes."""
        items = self._items
        if len(items) >= self.cap and key not in items:
            self._drop_first()
        expires_at = now + lifetime
        items[key] = (expires_at, value)
        queue = self._queues.get(lifetime)
        if queue is None:
            queue = self._queues[lifetime] = deque()
        queue.append((expires_at, key))
        self._queued += 1
        if self._queued > 2 * self.cap:  # overwrites and pops left stale queue entries: compact
            self._compact()

    def replace(self, key: K, old: V, new: V) -> None:
        """Swap the value of a live entry, keeping its expiry, if it still holds ``old``."""
        entry = self._items.get(key)
        if entry is not None and entry[1] is old:
            self._items[key] = (entry[0], new)

    def _live(self, expires_at: float, key: K) -> bool:
        entry = self._items.get(key)
        return entry is not None and entry[0] == expires_at

    def _drop_first(self) -> None:
        first: deque[tuple[float, K]] | None = None
        for queue in self._queues.values():
            while queue and not self._live(*queue[0]):
                queue.popleft()
                self._queued -= 1
            if queue and (first is None or queue[0][0] < first[0][0]):
                first = queue
        if first is not None:
            del self._items[first.popleft()[1]]
            self._queued -= 1

    def _compact(self) -> None:
        live = self._live
        for lifetime, queue in list(self._queues.items()):
            kept = deque(entry for entry in queue if live(*entry))
            if kept:
                self._queues[lifetime] = kept
            else:
                del self._queues[lifetime]
        self._queued = sum(len(queue) for queue in self._queues.values())

    def expire(self, now: float) -> None:
        items = self._items
        for queue in self._queues.values():
            while queue and queue[0][0] <= now:
                expires_at, key = queue.popleft()
                self._queued -= 1
                entry = items.get(key)
                if entry is not None and entry[0] == expires_at:
                    del items[key]
