"""Brute-force protection: an address that keeps presenting wrong credentials is blocked for a while.

ThingsBoard's transport IP limits (``TB_TRANSPORT_IP_RATE_LIMITS_ENABLED``, off by default; spec §1.2): after
``max_failures`` wrong credentials from one address, every attempt from it is refused for ``block_s`` without
looking the credentials up. A success clears the address's count; failures further apart than ``block_s``
do not add up (a device with a typo in its token, retrying once a minute, is never blocked).

Sans-IO: time is a parameter (seconds, monotonic). Memory is bounded: one small entry per address that failed
within the last ``block_s``, in least-recently-failed order, so the oldest entry is always the first to
expire; ``max_addresses`` caps it under a flood of distinct addresses (the oldest entries go first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tb_gateway.config import Settings


@dataclass(slots=True)
class _Failures:
    count: int
    last_s: float  # time of the latest failure; the entry expires block_s after it
    blocked_until: float


class Blocklist:
    def __init__(self, max_failures: int = 10, block_s: float = 60.0, max_addresses: int = 100_000) -> None:
        self.max_failures = max_failures
        self.block_s = block_s
        self._max_addresses = max_addresses
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds the address stays blocked; 0.0 when it may try."""
        entry = self._entries.get(address)
        return max(0.0, entry.blocked_until - now) if entry is not None else 0.0

    def failed(self, address: str, now: float) -> bool:
        """Count one wrong credential; True when this failure blocked the address."""
        self._expire(now)
        entry = self._entries.pop(address, None)
        if entry is None or now - entry.last_s >= self.block_s:
            entry = _Failures(0, now, 0.0)
        entry.count += 1
        entry.last_s = now
        blocked = entry.count >= self.max_failures and entry.blocked_until <= now
        if blocked:
            entry.blocked_until = now + self.block_s
            entry.count = 0  # after the block, a fresh allowance
        self._entries[address] = entry
        while len(self._entries) > self._max_addresses:
            self._entries.popitem(last=False)
        return blocked

    def succeeded(self, address: str) -> None:
        """Right credentials: the address starts afresh (a block in force is not lifted)."""
        entry = self._entries.get(address)
        if entry is not None and entry.blocked_until == 0.0:
            del self._entries[address]
        elif entry is not None:
            entry.count = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if now < max(oldest.last_s + self.block_s, oldest.blocked_until):
                return
            entries.popitem(last=False)


def configured(settings: Settings) -> Blocklist | None:
    """IP_BLOCK_ENABLED=true (off by default, as in ThingsBoard) -> the blocklist its settings describe."""
    if not settings.ip_block_enabled:
        return None
    return Blocklist(settings.ip_block_max_wrong_credentials, settings.ip_block_timeout_seconds)
