"""Bounded queue + batcher between the transports and the sink.

Transports call ``submit(records)`` with the records of one device message. Admission is all or nothing
and never blocks: a full queue answers ``Outcome.QUEUE_FULL`` at once (the transport refuses visibly).
Otherwise ``submit`` returns a future that resolves once the sink has made every record durable, and only
then may the transport acknowledge the device (DESIGN.md §4).

When a batch leaves (docs/pipeline.md):
- at once when the sink has a spare delivery slot besides the one this batch takes — so a lone message on an
  idle gateway never lingers;
- otherwise (the sink is busy) when it reaches ``batch_size``, when ``batch_timeout_s`` has passed since the
  batcher started filling it, or when a slot frees, whichever comes first. Batches therefore grow with load
  (natural batching) and latency stays low when traffic is light.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from tb_gateway.errors import SinkError
from tb_gateway.metrics import Metrics
from tb_gateway.records import Record
from tb_gateway.sinks.base import CallbackSink, Outcome, Sink, worst

try:  # settling a wholly delivered batch, and running its waiters, in C (built where a compiler is present)
    from tb_gateway._speedups import run_settled as _run_settled
    from tb_gateway._speedups import settle_delivered as _settle_delivered
except ImportError:  # pragma: no cover - the loops in _settle_batch do the same
    _settle_delivered = None  # type: ignore[assignment]
    _run_settled = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

GROUP_COMMIT_ENOUGH = 32  # records that make a batch worth its fdatasync (~45 µs of CPU) without waiting


class Ticket(asyncio.Future[Outcome]):
    """One device message: the future its transport waits on, resolved when the last of its records is
    settled. A subclass rather than a future plus a counter object: one allocation per message, not two."""

    __slots__ = ("outcome", "pending", "then")
    outcome: Outcome
    pending: int
    then: Callable[[asyncio.Future[Any]], None] | list[Callable[[asyncio.Future[Any]], None]] | None

    def settle(self, outcome: Outcome) -> None:
        if outcome is not Outcome.DELIVERED:
            self.outcome = worst(self.outcome, outcome)
        self.pending -= 1
        if not self.pending and not self.done():
            self.set_result(self.outcome)


def when_settled(future: asyncio.Future[Any], callback: Callable[[asyncio.Future[Any]], None]) -> None:
    """Call ``callback(future)`` once ``future`` (what ``submit`` returned) is done.

    For a pipeline ticket the pipeline calls it itself, in the same loop turn as it settles the batch, after
    every ticket of the batch is settled (so a connection answers all it can in one write), callbacks of one
    ticket in the order they were registered (the device API's first: it saves posted attributes before the
    device is answered). Plain ``add_done_callback`` would schedule it instead, and each scheduling hop
    waits for the loop's next pass over the sockets: about 1 ms under load, on every acknowledgement's path.
    """
    if type(future) is not Ticket or future.done():
        future.add_done_callback(callback)
    elif (then := future.then) is None:
        future.then = callback
    elif isinstance(then, list):
        then.append(callback)
    else:
        future.then = [then, callback]


def _nothing() -> None:
    pass


def _report(ticket: Ticket, exc: Exception) -> None:
    """A ticket's callback raised: one transport's bug must not keep the others' answers; say it loudly."""
    ticket.get_loop().call_exception_handler(
        {"message": "exception in a pipeline ticket callback", "exception": exc, "future": ticket}
    )


class Pipeline:
    # slots, not a dict: the C lanes read the queue's state at every message (_lanes.c, submit_one), and a
    # slot is a load where an instance dict is a lookup
    __slots__ = (
        "_batch_size",
        "_batch_timeout_s",
        "_closing",
        "_commit_interval_s",
        "_deliver_then",
        "_event_loop",
        "_idle",
        "_in_flight",
        "_kick_due",
        "_last_left",
        "_linger_until",
        "_max_in_flight",
        "_max_queue",
        "_metrics",
        "_queue",
        "_room",
        "_running",
        "_slots",
        "_tickets",
        "_timer",
        "_timer_at",
        "_wakeup",
        "poll",
        "sink",
    )

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        batch_size: int,
        batch_timeout_s: float,
        max_queue: int,
        commit_interval_s: float = 0.0,
    ) -> None:
        self.sink = sink
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_s
        self._max_queue = max_queue
        self._queue: deque[Record] = deque()
        self._tickets: deque[Ticket] = deque()  # side by side with _queue: a message's ticket per record
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._max_in_flight = sink.max_in_flight
        self._slots = asyncio.Semaphore(sink.max_in_flight)
        self._in_flight = 0
        self._closing = False
        self._commit_interval_s = commit_interval_s
        self._last_left = float("-inf")  # loop time the last batch left
        # a CallbackSink is fed by callbacks, not by the batching task (see _kick)
        self._deliver_then = sink.deliver_then if isinstance(sink, CallbackSink) else None
        # transports call this at each read: a finished delivery is settled then, not at the end of the pass
        self.poll: Callable[[], None] = sink.poll if isinstance(sink, CallbackSink) else _nothing
        self._running = False
        self._kick_due = False
        self._timer: asyncio.Handle | None = None  # the batcher's one wake-up, due at _timer_at
        self._timer_at = 0.0
        self._linger_until: float | None = None
        self._idle = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        metrics.queue_depth.set_function(lambda: len(self._queue))

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def closing(self) -> bool:
        return self._closing

    def has_room(self, count: int = 1) -> bool:
        return len(self._queue) + count <= self._max_queue

    async def wait_for_room(self) -> None:
        """For stream transports that stop reading their sockets instead of refusing (backpressure)."""
        while not self.has_room() and not self._closing:
            self._room.clear()
            await self._room.wait()

    def submit(self, records: Sequence[Record]) -> Outcome | asyncio.Future[Outcome]:
        """Admit one device message; an ``Outcome`` means refused (or empty) at once, a future means queued."""
        if self._closing:
            return Outcome.SHUTTING_DOWN
        count = len(records)
        if not count:
            return Outcome.DELIVERED
        if len(self._queue) + count > self._max_queue:
            return Outcome.QUEUE_FULL
        loop = self._event_loop
        if loop is None:  # bound on first use: the pipeline may be built before the loop runs
            loop = self._event_loop = asyncio.get_running_loop()
        ticket = Ticket(loop=loop)
        ticket.pending = count
        ticket.outcome = Outcome.DELIVERED
        ticket.then = None
        if count == 1:
            self._queue.append(records[0])
            self._tickets.append(ticket)
        else:
            self._queue.extend(records)
            self._tickets.extend([ticket] * count)
        if self._deliver_then is None:
            self._wakeup.set()
        else:  # once per loop pass: the batch takes in everything this pass admits
            self._kick_next_pass()
        return ticket

    def close(self) -> None:
        """Stop admitting; ``run`` returns once everything admitted so far is settled."""
        self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._deliver_then is not None:
            self._kick()

    async def run(self) -> None:
        if self._deliver_then is not None:
            await self._run_callbacks()
            return
        async with asyncio.TaskGroup() as deliveries:
            while True:
                if not self._queue:
                    if self._closing:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._slots.acquire()
                await self._linger()
                await self._group_commit()
                batch, owners = self._take()
                self._last_left = asyncio.get_running_loop().time()
                deliveries.create_task(self._deliver(batch, owners))

    def _take(self) -> tuple[list[Record], list[Ticket]]:
        """The next batch and its tickets, off the queue."""
        records, tickets = self._queue, self._tickets
        if len(records) <= self._batch_size:  # everything queued: copied in C, not popped one by one
            batch, owners = list(records), list(tickets)
            records.clear()
            tickets.clear()
        else:
            batch = [records.popleft() for _ in range(self._batch_size)]
            owners = [tickets.popleft() for _ in range(self._batch_size)]
        self._room.set()
        self._in_flight += 1
        return batch, owners

    # --- a CallbackSink: the same batching rules, driven by callbacks -----------------------------------
    # The batching task above waits on events, and every wake-up of a task, like the task created per
    # delivery, is a scheduling hop that waits for the loop's pass over its sockets (1 ms and more under
    # load). Here nothing waits on a task: the sink's answer settles the batch itself (see _delivered for
    # when the next batch leaves).

    async def _run_callbacks(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._running = True
        try:
            self._kick()
            while not (self._closing and not self._queue and not self._in_flight):
                self._idle.clear()
                await self._idle.wait()
        finally:
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _kick_next_pass(self) -> None:
        if not self._kick_due and self._event_loop is not None:
            self._kick_due = True
            self._event_loop.call_soon(self._kick_soon)

    def _kick_soon(self) -> None:
        self._kick_due = False
        self._kick()

    def _kick(self) -> None:
        """Hand the sink every batch that may leave now (the rules of _linger and _group_commit), or arm the
        timer for when the next one may."""
        deliver_then, loop = self._deliver_then, self._event_loop
        if not self._running or deliver_then is None or loop is None:
            return
        queue = self._queue
        while queue and self._in_flight < self._max_in_flight:
            now = loop.time()
            if not self._closing and len(queue) < self._batch_size:
                leave_at = None
                if self._sink_busy():  # linger: fill up until the size, the timeout or a free slot
                    if self._linger_until is None:
                        self._linger_until = now + self._batch_timeout_s
                    leave_at = self._linger_until
                if len(queue) < min(self._batch_size, GROUP_COMMIT_ENOUGH):  # group commit
                    commit_at = self._last_left + self._commit_interval_s
                    leave_at = commit_at if leave_at is None else max(leave_at, commit_at)
                if leave_at is not None and leave_at > now:
                    self._wake_at(leave_at)
                    return
            self._linger_until = None
            batch, owners = self._take()
            self._last_left = now
            try:
                deliver_then(batch, partial(self._delivered, batch, owners))
            except Exception as exc:
                self._settle_batch(batch, owners, exc)
        if self._closing and not queue and not self._in_flight:
            self._idle.set()

    def _wake_at(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # an earlier kick re-checks and re-arms
            timer.cancel()
        assert self._event_loop is not None
        # the time is kept here: for a deadline under 1 ms away uvloop's call_at returns a plain Handle,
        # which has no when()
        self._timer = self._event_loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _delivered(self, records: list[Record], tickets: list[Ticket], outcomes: Any) -> None:
        """A CallbackSink's answer (the outcomes, or the exception its delivery raised).

        The next batch leaves on the loop's next pass, not at once: under load a pass is long, so batches
        grow and each fdatasync serves more records (at once, CoAP with 1,000 requests waiting made 3x the
        fdatasyncs and context switches and lost 5-10% of its throughput); on a quiet loop a pass is short.
        """
        try:
            self._settle_batch(records, tickets, outcomes)
        finally:
            self._kick_next_pass()

    def _sink_busy(self) -> bool:
        """Busy = every other delivery slot is taken: the batch about to leave would be the last in flight.

        A sink with one slot (the embedded store) is never busy once the batcher holds the slot; a sink with
        several (Kafka) takes small batches in parallel while it has spare slots, so latency stays low.
        """
        return self._in_flight > 0 and self._in_flight >= self._max_in_flight - 1

    async def _linger(self) -> None:
        """While the sink is busy, let the batch fill up to its size, its timeout or until a slot frees."""
        if not self._sink_busy() or self._closing or len(self._queue) >= self._batch_size:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._batch_timeout_s
        while len(self._queue) < self._batch_size and self._sink_busy() and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    async def _group_commit(self) -> None:
        """Group commit: batches start at most every ``commit_interval_s`` (the embedded store pays ~45 µs of
        CPU per fdatasync however few records it carries). A batch after a quiet spell leaves at once, so a
        lone message never waits; under a steady stream a batch waits at most the interval. A plain sleep, not
        a wake-up per arriving record: the interval is short and a full batch cannot build up within it at
        the rates that make small batches."""
        if len(self._queue) >= min(self._batch_size, GROUP_COMMIT_ENOUGH) or self._closing:
            return  # enough records to share the fdatasync already: waiting would only add latency
        wait = self._last_left + self._commit_interval_s - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _deliver(self, records: list[Record], tickets: list[Ticket]) -> None:
        try:
            outcomes: Sequence[Outcome] | BaseException = await self.sink.deliver(records)
        except Exception as exc:  # judged by _settle_batch, like a callback sink's failure
            outcomes = exc
        self._settle_batch(records, tickets, outcomes)

    def _settle_batch(
        self, records: list[Record], tickets: list[Ticket], outcomes: Sequence[Outcome] | BaseException
    ) -> None:
        try:
            if isinstance(outcomes, SinkError):
                log.error("sink %s failed a batch of %d records: %s", self.sink.name, len(records), outcomes)
                self._metrics.errors.labels(component="sink").inc()
                outcomes = [Outcome.SINK_FAILED] * len(records)
            elif isinstance(outcomes, BaseException):
                # a bug in a sink must not take the pipeline down: answer the devices, say it loudly
                log.error(
                    "sink %s raised unexpectedly on a batch of %d records",
                    self.sink.name,
                    len(records),
                    exc_info=outcomes,
                )
                self._metrics.errors.labels(component="sink").inc()
                outcomes = [Outcome.SINK_FAILED] * len(records)
        finally:
            self._in_flight -= 1
            if self._deliver_then is None:
                self._slots.release()
                self._wakeup.set()
        self._metrics.count_sent(records, outcomes)
        delivered = Outcome.DELIVERED
        waiting: list[Ticket] = tickets
        if _settle_delivered is not None and outcomes.count(delivered) == len(outcomes):
            waiting = _settle_delivered(tickets)  # the common case in one C call; the tickets with waiters
        else:
            for ticket, outcome in zip(tickets, outcomes, strict=True):
                if outcome is delivered and ticket.pending == 1:  # a one-record message, or its last record
                    ticket.pending = 0
                    if not ticket.done():
                        ticket.set_result(ticket.outcome)
                else:
                    ticket.settle(outcome)
        if _run_settled is not None:  # the loop below, in C
            _run_settled(waiting, _report)
            return
        for ticket in waiting:  # the waiters, once the whole batch is settled (see when_settled)
            then = ticket.then
            if then is not None and ticket.done():
                ticket.then = None
                for callback in then if isinstance(then, list) else (then,):
                    try:
                        callback(ticket)
                    except Exception as exc:  # one transport's bug must not keep the others' answers
                        _report(ticket, exc)
