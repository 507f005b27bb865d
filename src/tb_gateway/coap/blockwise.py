"""Block1 reassembly (RFC 7959 §2.5, atomic requests): request bodies larger than one datagram.

A client sends block 0, 1, ... with the more-flag set on all but the last; the server answers each
intermediate block 2.31 Continue and hands the whole body to the application only with the last one.
Transfers are keyed by the client's address and request URI (tokens may change between blocks). Memory is
bounded twice: each body by ``max_body`` (4.13 beyond it) and the number of concurrent transfers by
``max_transfers`` (the oldest is dropped first), and an abandoned transfer lives at most ``lifetime_s``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from tb_gateway.coap.codec import Block, Code


@dataclass(slots=True)
class _Transfer:
    expires_at: float
    body: bytearray = field(default_factory=bytearray)


class Reassembler:
    def __init__(self, max_body: int, max_transfers: int, lifetime_s: float) -> None:
        self.max_body = max_body
        self.max_transfers = max_transfers
        self.lifetime_s = lifetime_s
        self._transfers: dict[Hashable, _Transfer] = {}

    def __len__(self) -> int:
        return len(self._transfers)

    def feed(self, key: Hashable, block: Block, payload: bytes, size1: int | None, now: float) -> bytes | int:
        """Take one block; return the complete body, or the response code to answer this block with.

        ``Code.CONTINUE`` asks for the next block; 4.08 means a block arrived out of order (or the transfer
        was forgotten), 4.13 that the body exceeds ``max_body``, 4.00 that a non-final block has the wrong
        size.
        """
        if size1 is not None and size1 > self.max_body:
            self._transfers.pop(key, None)
            return Code.REQUEST_ENTITY_TOO_LARGE
        if block.more and len(payload) != block.size:
            self._transfers.pop(key, None)
            return Code.BAD_REQUEST
        offset = block.num * block.size
        if block.num == 0:
            transfer = _Transfer(now + self.lifetime_s)
            self._transfers.pop(key, None)
            self._make_room()
            self._transfers[key] = transfer
        else:
            found = self._transfers.get(key)
            if found is None or found.expires_at <= now or offset != len(found.body):
                self._transfers.pop(key, None)
                return Code.REQUEST_ENTITY_INCOMPLETE
            transfer = found
        if offset + len(payload) > self.max_body:
            del self._transfers[key]
            return Code.REQUEST_ENTITY_TOO_LARGE
        transfer.body += payload
        if block.more:
            return Code.CONTINUE
        del self._transfers[key]
        return bytes(transfer.body)

    def _make_room(self) -> None:
        while len(self._transfers) >= self.max_transfers:
            del self._transfers[next(iter(self._transfers))]

    def expire(self, now: float) -> None:
        """Drop abandoned transfers. Insertion order is expiry order: every lifetime starts at block 0."""
        transfers = self._transfers
        while transfers:
            key = next(iter(transfers))
            if transfers[key].expires_at > now:
                return
            del transfers[key]
