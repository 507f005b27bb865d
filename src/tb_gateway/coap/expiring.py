"""A dict whose entries live for a fixed time and never number more than a cap: the endpoint's memory bound.

Entries are ``(expires_at, value)`` pairs and the expiry queue holds ``(expires_at, key)`` pairs, so when the
values are bytes (an answered exchange keeps only its reply) every long-lived object is a tuple of atoms that
CPython's cyclic GC stops tracking. Under load that keeps full collections cheap however many entries are
kept — a map of live objects would make every gen-2 collection walk the whole de-duplication history.
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
        self._order: deque[tuple[float, K]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        entry = self._items.pop(key, None)
        return None if entry is None else entry[1]

    def put(self, key: K, value: V, expires_at: float) -> None:
        """Insert (or overwrite); at the cap the oldest entry goes first."""
        items = self._items
        if len(items) >= self.cap and key not in items:
            self._drop_oldest()
        items[key] = (expires_at, value)
        self._order.append((expires_at, key))
        if len(self._order) > 2 * self.cap:  # overwrites left stale queue entries: compact
            self._order = deque(sorted((exp, k) for k, (exp, _) in items.items()))

    def replace(self, key: K, old: V, new: V) -> None:
        """Swap the value of a live entry, keeping its expiry, if it still holds ``old``."""
        entry = self._items.get(key)
        if entry is not None and entry[1] is old:
            self._items[key] = (entry[0], new)

    def _drop_oldest(self) -> None:
        order, items = self._order, self._items
        while order:
            expires_at, key = order.popleft()
            entry = items.get(key)
            if entry is not None and entry[0] == expires_at:
                del items[key]
                return

    def expire(self, now: float) -> None:
        order, items = self._order, self._items
        while order and order[0][0] <= now:
            expires_at, key = order.popleft()
            entry = items.get(key)
            if entry is not None and entry[0] == expires_at:
                del items[key]
