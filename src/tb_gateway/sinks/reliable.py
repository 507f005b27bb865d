"""Store and forward: a wrapper that keeps every record its backend cannot take yet in a local spool.

``SpoolingSink(primary, spool, metrics)`` depends only on the ``Sink`` protocol, so it wraps the Kafka sink
and the ThingsBoard HTTP sink alike. The rules (docs/kafka-records.md, "Delivery and duplicates"):

- Healthy and spool empty: a batch goes to the primary. Records it answers ``SINK_FAILED`` (or the whole
  batch when it raises ``RetriableSinkError``) are appended to the spool, fsynced, and answered DELIVERED.
- Spool not empty, or the primary says it is down: new batches go straight to the spool, behind what is
  there, so a device's new records never overtake its spooled ones. Spool at its cap: ``SPOOL_FULL``.
- Results are settled in the order the batches arrived. A batch that comes back from the primary after an
  earlier one was spooled also spools its records of the devices that now have spooled records, even those
  the primary took: they are sent again after the spooled ones (a duplicate with the same ``msg_id``),
  which keeps the last copy of every record in per-device order.
- ``run`` replays the spool oldest first, one chunk at a time, with capped exponential backoff while the
  primary keeps failing. A chunk is committed up to its first failure; the rest is sent again.

What it asks of the primary: the order in which ``deliver`` was called is the order in which records reach
the backend, also with several calls in flight (Kafka keeps produce order per partition). A primary that
cannot promise that sets ``max_in_flight = 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tb_gateway.clock import now_ms
from tb_gateway.errors import RetriableSinkError, SinkError
from tb_gateway.metrics import Metrics
from tb_gateway.records import Record
from tb_gateway.sinks.base import Outcome, Sink
from tb_gateway.sinks.spool import Spool, Spooled

log = logging.getLogger(__name__)

T = TypeVar("T")

REPLAY_CHUNK_RECORDS = 500  # one primary round trip per chunk; a few hundred amortize it well
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0  # how late replay may notice that the backend is back


class SpoolClosedError(RetriableSinkError):
    """A call reached the spool after ``close``; nothing was written."""


class SpoolingSink:
    def __init__(
        self,
        primary: Sink,
        spool: Spool,
        metrics: Metrics,
        *,
        replay_chunk_records: int = REPLAY_CHUNK_RECORDS,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.primary = primary
        self.name = f"{primary.name}+spool"
        self.max_in_flight = primary.max_in_flight
        self.spool = spool
        self._metrics = metrics
        self._chunk = replay_chunk_records
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._clock_ms = clock_ms
        self._io = asyncio.Lock()  # every spool call, one at a time, off the event loop
        self._tail: asyncio.Future[None] | None = None  # settles when the latest deliver call has settled
        self._spooled = asyncio.Event()  # replay has something to do
        self._closing = asyncio.Event()
        self._opened = False
        self._last_error = ""
        self._refusing = False  # the last append did not fit: devices are being refused
        labels = {"sink": primary.name}
        metrics.spool_records.labels(**labels).set_function(lambda: self.spool.records)
        metrics.spool_bytes.labels(**labels).set_function(lambda: self.spool.bytes)
        metrics.spool_oldest_age.labels(**labels).set_function(self._oldest_age_s)
        self._replayed = metrics.spool_replayed.labels(**labels)
        self._spooled_total = metrics.spool_appended.labels(**labels)

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.open)
        self._opened = True
        if self.spool.records:
            self._spooled.set()
        await self.primary.start()

    async def run(self) -> None:
        """The primary's own background work beside the replay loop, until ``close``."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.primary.run(), name=f"{self.primary.name}-run")
            tasks.create_task(self._replay(), name=f"{self.primary.name}-replay")

    async def close(self) -> None:
        self._closing.set()
        self._spooled.set()
        await self.primary.close()
        async with self._io:
            self._opened = False
            await asyncio.to_thread(self.spool.close)

    def health(self) -> dict[str, Any]:
        primary = self.primary.health()
        spool = self.spool.stats(self._clock_ms())
        spool["refusing"] = self._refusing
        primary_status = primary.get("status", "up")
        if self.spool.records == 0 and primary_status != "down":
            status = primary_status
        else:  # the backend down is "degraded" while the spool takes what comes, empty or not (docs/metrics.md)
            status = "down" if self._refusing and primary_status == "down" else "degraded"
        return {"status": status, "primary": primary, "spool": spool}

    # --- delivering ---

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        loop = asyncio.get_running_loop()
        previous, done = self._tail, loop.create_future()
        self._tail = done
        try:
            direct = self.spool.records == 0 and self.primary.health().get("status") != "down"
            outcomes = list(await self._send(batch)) if direct else [Outcome.SINK_FAILED] * len(batch)
            if previous is not None and not previous.done():
                # settle in arrival order; never cancels the earlier call. Awaited only when pending: on a
                # done future asyncio.wait still costs two passes of the loop (~1 ms each under load).
                await asyncio.wait([previous])
            return await self._settle(batch, outcomes)
        finally:
            done.set_result(None)

    async def _send(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        try:
            return await self.primary.deliver(batch)
        except SinkError as exc:
            if not exc.retriable:
                raise
            self._note_failure(str(exc))
            return [Outcome.SINK_FAILED] * len(batch)

    async def _settle(self, batch: Sequence[Record], outcomes: list[Outcome]) -> list[Outcome]:
        """Spool what failed, and what must not overtake records of its device already in the spool."""
        if not self.spool.records and outcomes.count(Outcome.DELIVERED) == len(outcomes):
            return outcomes  # the common case, without a pass over the records
        held = set(self.spool.devices)
        keep: list[int] = []
        for i, (record, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            if outcome is Outcome.SINK_FAILED or (outcome is Outcome.DELIVERED and record.device.id in held):
                keep.append(i)
                held.add(record.device.id)
        if not keep:
            return outcomes
        stored = await self._io_call(self.spool.append, [batch[i] for i in keep])
        self._refusing = not stored
        if stored:
            self._spooled_total.inc(len(keep))
            self._spooled.set()
        for i in keep:
            if outcomes[i] is Outcome.SINK_FAILED:
                outcomes[i] = Outcome.DELIVERED if stored else Outcome.SPOOL_FULL
            elif not stored:
                log.warning("spool full: a record the backend took may now precede its device's spooled ones")
        return outcomes

    # --- replaying ---

    async def _replay(self) -> None:
        with contextlib.suppress(SpoolClosedError):  # shutdown: what was not committed is replayed next time
            await self._replay_loop()

    async def _replay_loop(self) -> None:
        backoff = self._backoff_initial_s
        while not self._closing.is_set():
            await self._spooled.wait()
            if self._closing.is_set():
                return
            if self._tail is not None and not self._tail.done():
                await asyncio.wait([self._tail])  # direct batches in flight settle (and maybe spool) first
            chunk = await self._io_call(self.spool.read, self._chunk)
            if not chunk:
                self._spooled.clear()
                if self.spool.records:  # counted but unreadable: should not happen; never spin on it
                    log.error("spool counts %d records but none could be read", self.spool.records)
                    self._spooled.set()
                    await self._io_call(self.spool.rewind)
                    await self._sleep(self._backoff_max_s)
                continue
            sent = await self._replay_chunk(chunk)
            if sent == len(chunk):
                backoff = self._backoff_initial_s
                continue
            await self._io_call(self.spool.rewind)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _replay_chunk(self, chunk: list[Spooled]) -> int:
        """Send one chunk; commit its longest prefix that the primary settled for good; return its length."""
        records = [item.record for item in chunk]
        try:
            outcomes = list(await self.primary.deliver(records))
        except SinkError as exc:
            if exc.retriable:
                self._note_failure(str(exc))
                outcomes = [Outcome.SINK_FAILED] * len(chunk)
            else:
                log.error("backend refused %d spooled records for good: %s", len(chunk), exc)
                outcomes = [Outcome.REJECTED] * len(chunk)
        sent = next((i for i, o in enumerate(outcomes) if o is Outcome.SINK_FAILED), len(chunk))
        rejected = sum(1 for o in outcomes[:sent] if o is Outcome.REJECTED)
        if rejected:
            log.error("backend rejected %d spooled records for good; they are dropped and counted", rejected)
            self._metrics.records_failed.labels(outcome=Outcome.REJECTED.value).inc(rejected)
        if sent:
            await self._io_call(self.spool.commit, chunk[:sent])
            self._refusing = False
            self._replayed.inc(sent - rejected)
            if self.spool.records == 0:
                log.info("spool drained; sending to %s directly again", self.primary.name)
        return sent

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            pass

    async def _io_call(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._io:
            if not self._opened:
                raise SpoolClosedError("the spool is closed")
            return await asyncio.to_thread(fn, *args)

    def _note_failure(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s failed, spooling: %s", self.primary.name, message)
            self._last_error = message

    def _oldest_age_s(self) -> float:
        oldest = self.spool.oldest_received_at
        return 0.0 if oldest is None else max((self._clock_ms() - oldest) / 1000, 0.0)
