"""The one small interface every sink implements, and the outcome vocabulary shared with the transports."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from tb_gateway.records import Record


class Outcome(enum.StrEnum):
    """What became of a record (or a whole device message: its worst record)."""

    DELIVERED = "delivered"  # durable: sink confirmed it, or fsynced in the spool
    RATE_LIMITED = "rate_limited"  # the device is over a per-device rate limit: refused before admission
    QUEUE_FULL = "queue_full"  # pipeline at its bound: refused before anything was stored
    SPOOL_FULL = "spool_full"  # backend down and the spool at its cap
    REJECTED = "rejected"  # the backend will never take it (too large for the topic, ...)
    SINK_FAILED = "sink_failed"  # the sink failed and nothing could keep the record
    SHUTTING_DOWN = "shutting_down"

    @property
    def delivered(self) -> bool:
        return self is Outcome.DELIVERED


# Declared best first, so the rank grows with severity: a message made of several records is answered with
# the worst of their outcomes (worst(DELIVERED, REJECTED) is REJECTED: a device is never acked for a refusal).
SEVERITY = {outcome: rank for rank, outcome in enumerate(Outcome)}


def worst(a: Outcome, b: Outcome) -> Outcome:
    return a if SEVERITY[a] >= SEVERITY[b] else b


class Sink(Protocol):
    """A destination that makes batches durable.

    ``deliver`` returns one outcome per record, in order, and returns only once every DELIVERED record is
    durable. It may raise ``SinkError``; the pipeline then answers the whole batch ``SINK_FAILED``.
    ``max_in_flight`` is how many ``deliver`` calls the pipeline may have running at once. The app runs
    ``run`` as a task beside the pipeline, and calls ``close`` last in shutdown, after the pipeline flushed.
    """

    name: str
    max_in_flight: int

    async def start(self) -> None: ...

    async def run(self) -> None:
        """Background work (replaying a spool, polling a producer) until ``close``; may return at once."""
        ...

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        """``{"status": "up" | "degraded" | "down", ...details}`` for /health."""
        ...


@runtime_checkable
class CallbackSink(Sink, Protocol):
    """A sink that can also report a batch through a plain callback, which the pipeline prefers.

    ``deliver_then(batch, done)`` starts the delivery and returns; ``done`` is later called on the event loop,
    once, with what ``deliver`` would have returned or the exception it would have raised. Awaiting a
    coroutine costs two scheduling hops per batch (the task's first step, its wake-up), each waiting for
    the loop's next pass over the sockets: about 1 ms each under load (docs/pipeline.md).
    """

    def deliver_then(self, batch: Sequence[Record], done: Callable[[Any], None]) -> None: ...

    def poll(self) -> None:
        """Call, now, the ``done`` of deliveries that have finished (a sink calls them later by itself)."""
        ...
