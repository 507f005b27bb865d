"""A dict whose entries live for a fixed time and never number more than a cap: the endpoint's memory bound.

Entries are ``(expires_at, value, serial)`` and the expiry queues hold ``(expires_at, key, serial)``: the
serial numbers the put, so an entry left in a queue by an older put of the same key is known stale even when
both expire at the same instant (a key dropped at the cap and put again at once). When the values are bytes
(an answered exchange keeps only its reply) every long-lived object is a tuple of atoms that CPython's cyclic
GC stops tracking. Under load that keeps full collections cheap however many entries are
kept — a map of live objects would make every gen-2 collection walk the whole de-duplication history.

There is one queue per lifetime: with a non-decreasing ``now`` each queue is in expiry order by construction,
whereas one shared queue would let a long-lived entry hide a shorter-lived one inserted after it (a NON's
145 s behind a CON's 247 s). Callers use a few fixed lifetimes, so there are a few queues.

``PeerWindowedMap`` also keeps at most ``window`` entries per peer (the first item of a key), dropping a
peer's oldest even before it expires, as Californium's ``PEERS_MARK_AND_SWEEP`` de-duplicator does (64 per
peer by default there too): a device retransmits only its latest messages (NSTART is 1), so older ones need
no memory. Without it a busy gateway keeps ``cap`` entries whatever its peers: 100,000 at 75k messages/s,
~30 MB that every lookup reaches into through cache misses (CoAP throughput 79k -> 100k/s with 2,000).
Entries left stale in the queues by windows, pops and overwrites leave as they reach the front of their
queue at the next ``put``, or in a compaction once they outnumber the live ones by an eighth of the cap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
P = TypeVar("P", bound=Hashable)


class ExpiringMap(Generic[K, V]):
    window = 0  # entries kept per peer: PeerWindowedMap (the C lane reads it)

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: dict[K, tuple[float, V, int]] = {}
        # lifetime -> (expires_at, key, serial), oldest first
        self._queues: dict[float, deque[tuple[float, K, int]]] = {}
        self._queued = 0  # entries in all queues, stale ones (overwritten or popped keys) included
        self._serial = 0  # of the last put

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        entry = self._items.pop(key, None)
        if entry is None:
            return None
        self._removed(key)
        return entry[1]

    def put(self, key: K, value: V, now: float, lifetime: float) -> None:
        """Insert (or overwrite) for ``lifetime`` seconds from ``now``; at the cap the first to expire goes."""
        items = self._items
        if len(items) >= self.cap and key not in items:
            self._drop_first()
        expires_at = now + lifetime
        self._serial = serial = self._serial + 1
        items[key] = (expires_at, value, serial)
        queue = self._queues.get(lifetime)
        if queue is None:
            queue = self._queues[lifetime] = deque()
        queue.append((expires_at, key, serial))
        self._queued += 1
        while not self._live(*queue[0]):  # a stale front goes now, not all at once in a compaction (latency)
            queue.popleft()
            self._queued -= 1
        if self._queued > 2 * len(items) + self.cap // 8:  # stale entries outnumber the live ones: compact
            self._compact()

    def replace(self, key: K, old: V, new: V) -> None:
        """Swap the value of a live entry, keeping its expiry, if it still holds ``old``."""
        entry = self._items.get(key)
        if entry is not None and entry[1] is old:
            self._items[key] = (entry[0], new, entry[2])

    def _live(self, expires_at: float, key: K, serial: int) -> bool:
        entry = self._items.get(key)
        return entry is not None and entry[2] == serial

    def _drop_first(self) -> None:
        first: deque[tuple[float, K, int]] | None = None
        for queue in self._queues.values():
            while queue and not self._live(*queue[0]):
                queue.popleft()
                self._queued -= 1
            if queue and (first is None or queue[0][0] < first[0][0]):
                first = queue
        if first is not None:
            key = first.popleft()[1]
            del self._items[key]
            self._queued -= 1
            self._removed(key)

    def _removed(self, key: K) -> None:
        """``key`` left the map (expired, dropped at the cap, popped): for a subclass's own bookkeeping."""

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
                _, key, serial = queue.popleft()
                self._queued -= 1
                entry = items.get(key)
                if entry is not None and entry[2] == serial:
                    del items[key]
                    self._removed(key)


class PeerWindowedMap(ExpiringMap[tuple[P, Hashable], V]):
    """An ExpiringMap of ``(peer, id)`` keys that also keeps at most ``window`` entries per peer, the newest.

    Each peer's window holds ``(expires_at, key, serial)`` in insertion order; an entry that left the map by other
    means stays there, stale, until it reaches the front (so a window may hold a few fewer live entries).
    """

    def __init__(self, cap: int, window: int) -> None:
        super().__init__(cap)
        self.window = window
        self._windows: dict[P, deque[tuple[float, tuple[P, Hashable], int]]] = {}

    def put(self, key: tuple[P, Hashable], value: V, now: float, lifetime: float) -> None:
        super().put(key, value, now, lifetime)
        if self.window <= 0:  # no per-peer bound
            return
        window = self._windows.get(key[0])
        if window is None:
            window = self._windows[key[0]] = deque()
        window.append((now + lifetime, key, self._serial))
        if len(window) > self.window:
            expires_at, oldest, serial = window.popleft()
            if self._live(expires_at, oldest, serial):
                del self._items[oldest]
            self._trim(key[0], window)

    def _removed(self, key: tuple[P, Hashable]) -> None:
        window = self._windows.get(key[0])
        if window is not None:
            self._trim(key[0], window)

    def _trim(self, peer: P, window: deque[tuple[float, tuple[P, Hashable], int]]) -> None:
        """Drop the window's stale front; an empty window goes (peers come and go: NAT rebinding)."""
        while window and not self._live(*window[0]):
            window.popleft()
        if not window:
            del self._windows[peer]
