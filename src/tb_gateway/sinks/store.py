"""The embedded store: the sink when there is no backend (DATA_DIR/messages/, a segment log: segments.py).

``deliver`` returns once the batch is ``fdatasync``ed, so an acknowledged record survives ``kill -9`` and
power loss. One writer thread does the blocking work, fed through a queue and answering with
``call_soon_threadsafe`` (cheaper than an executor hop per batch); ``max_in_flight = 1`` makes batches
queue up behind it, which is what makes them grow under load (the pipeline's natural batching), so one
sync is paid per batch, not per record.

Retention (``STORE_MAX_BYTES``, ``STORE_RETENTION_HOURS``): the writer removes the oldest whole segments
after each roll-over, and ``run`` asks it again every ``RETENTION_CHECK_S`` so that age counts on a quiet log.

``read_messages`` is the reader side used by ``tb-gateway messages``; it takes no lock and stops at the
current tail, so it runs beside the gateway (and beside several workers appending to the same log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

from tb_gateway.errors import RetriableSinkError
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.segments import MAX_PAYLOAD, SEGMENT_BYTES, SegmentWriter, read_log

try:  # the C fast path (setup.py builds it where a compiler is present): a batch's lines in one call
    from tb_gateway._speedups import Poller as _Poller
    from tb_gateway._speedups import entry as _entry
    from tb_gateway._speedups import store_lines as _store_lines
except ImportError:  # pragma: no cover - _encode below does the same, record by record
    _entry = None  # type: ignore[assignment]
    _store_lines = None  # type: ignore[assignment]
    _Poller = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

T = TypeVar("T")
RETENTION_CHECK_S = 60.0  # how often the age limit is checked besides roll-overs
TEMPLATES_MAX = 10_000  # encoded record prefixes kept (device x kind x transport); cleared when full
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, Callable[[Any, "BaseException | None"], None]]


class StoreSink:
    name = "embedded"
    max_in_flight = 1

    def __init__(
        self,
        path: Path,
        segment_bytes: int = SEGMENT_BYTES,
        *,
        max_bytes: int = 0,
        max_age_s: float = 0.0,
        on_removed: Callable[[str], object] = lambda reason: None,
        check_every_s: float = RETENTION_CHECK_S,
    ) -> None:
        self._path = path
        self._log = SegmentWriter(path, segment_bytes, max_bytes=max_bytes, max_age_s=max_age_s, on_removed=on_removed)
        self._check_every_s = check_every_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._templates: dict[tuple[int, RecordKind, Transport], tuple[DeviceIdentity, bytes, bytes]] = {}
        self.stored = 0
        # (callback, result, exception) of writes the thread finished; deque appends and pops are atomic
        self._finished: deque[tuple[Callable[[Any, BaseException | None], None], Any, BaseException | None]] = deque()
        self._polling = False
        # what transports call at every read: the usual read (nothing finished) is a length check in C
        self.poll: Callable[[], None] = self._poll if _Poller is None else _Poller(self._finished, self._poll)

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="store-writer", daemon=True)
        self._thread.start()
        await self._call(self._log.open)

    async def run(self) -> None:
        """Every batch is written by ``deliver``; this only checks retention now and then (off the loop)."""
        if not (self._log.max_bytes or self._log.max_age_s):
            return
        while True:
            await asyncio.sleep(self._check_every_s)
            if self._thread is None:  # closed
                return
            try:
                await self._call(self._log.enforce_retention)
            except OSError as exc:  # the next check tries again; appends report their own errors
                log.warning("embedded store: retention check failed: %s", exc)

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.deliver_then(batch, partial(_answer, future))
        answer = await future
        if isinstance(answer, BaseException):
            raise answer
        return cast(Sequence[Outcome], answer)

    def deliver_then(self, batch: Sequence[Record], done: Callable[[Any], None]) -> None:
        """Write ``batch`` on the writer thread; ``done`` gets the outcomes on the loop (CallbackSink)."""
        # all of them, unless one could not be encoded or is oversized (never, with MAX_PAYLOAD_SIZE in force
        # and normalize.py refusing what JSON cannot hold); checked in C (map, max) on the common path
        payloads: Sequence[bytes | None]
        try:
            payloads = encoded = self.encode(batch)
            kept = (
                encoded
                if max(map(len, encoded), default=0) <= MAX_PAYLOAD
                else [p for p in encoded if len(p) <= MAX_PAYLOAD]
            )
        except TypeError:  # orjson's JSONEncodeError: a record JSON cannot hold fails alone, not its batch
            payloads = [self._encode_alone(record) for record in batch]
            kept = [p for p in payloads if p is not None and len(p) <= MAX_PAYLOAD]

        def written(_: Any, exc: BaseException | None) -> None:
            if isinstance(exc, OSError):  # disk full, I/O error: not acknowledged
                self._last_error = str(exc)
                error = RetriableSinkError(f"embedded store write failed: {exc}")
                error.__cause__ = exc
                done(error)
                return
            if exc is not None:
                done(exc)
                return
            self._last_error = None
            self.stored += len(kept)
            if len(kept) == len(payloads):
                done([Outcome.DELIVERED] * len(payloads))
            else:
                done([Outcome.REJECTED if p is None or len(p) > MAX_PAYLOAD else Outcome.DELIVERED for p in payloads])

        if kept:
            self._submit(lambda: self._log.append(kept), written)
        else:  # never called back from inside deliver_then: the caller may not expect it yet
            asyncio.get_running_loop().call_soon(written, None, None)

    async def close(self) -> None:
        if self._thread is None:
            return
        await self._call(self._log.close)
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    def health(self) -> dict[str, Any]:
        status = "down" if not self._log.is_open or self._last_error else "up"
        detail: dict[str, Any] = {"status": status, "kind": self.name, "path": str(self._path)}
        if self._last_error:
            detail["error"] = self._last_error
        return detail

    def encode(self, batch: Sequence[Record]) -> list[bytes]:
        """Every record's JSON line: in C from the cached templates (a third of the cost), else ``_encode``."""
        if _store_lines is not None and type(batch) is list:
            return _store_lines(batch, self._templates, orjson.dumps, self._encode)
        return [self._encode(r) for r in batch]

    def _encode_alone(self, record: Record) -> bytes | None:
        """A record's line, or None (logged) when JSON cannot hold it: it is answered REJECTED alone."""
        try:
            return self._encode(record)
        except TypeError as exc:
            log.error(
                "embedded store: refused a record of device %s that JSON cannot hold: %s", record.device.name, exc
            )
            return None

    def _encode(self, record: Record) -> bytes:
        """``orjson.dumps(record.to_dict())``, byte for byte, at a third of the cost: per device, kind and
        transport the constant parts are encoded once (this is most of the store's CPU per record)."""
        device = record.device
        # keyed by the identity object (hashing the dataclass costs more than the lookup); the entry keeps
        # the object, so a recycled id() never matches another device's entry
        key = (id(device), record.kind, record.transport)
        parts = self._templates.get(key)
        if parts is None or parts[0] is not device:
            if len(self._templates) >= TEMPLATES_MAX:
                self._templates.clear()
            head = {"device": device.name, "device_id": device.id, "device_type": device.type}
            head["kind"] = record.kind.value
            parts = self._templates[key] = (
                device,
                orjson.dumps(head)[:-1] + b',"ts":',
                b',"transport":' + orjson.dumps(record.transport.value) + b',"received_at":',
            )
        ts, received_at = record.ts, record.received_at
        if type(ts) is not int or type(received_at) is not int:  # never, but %d would hide it
            return orjson.dumps(record.to_dict())
        values = orjson.dumps(record.values)
        if _entry is not None and (line := _entry(parts[1], ts, values, parts[2], received_at)) is not None:
            return line
        return b'%b%d,"values":%b%b%d}' % (parts[1], ts, values, parts[2], received_at)

    def _call(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Runs ``work`` on the writer thread; its result or exception comes back on this loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(work, partial(_settle, future))
        return future

    def _submit(self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Runs ``work`` on the writer thread, then ``done(result, exception)`` on this loop."""
        assert self._thread is not None, "start() first"
        self._jobs.put((work, asyncio.get_running_loop(), done))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop = job[1]
            self._finished.append(_run(job))
            # The finished entry is now the only reference to the batch (records, tickets, payloads): it is
            # freed on the loop after the devices are answered. Held here until the next job came in, it was
            # freed first thing in the next write, holding the GIL, on every batch's way to its fdatasync.
            job = None
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(self.poll)

    def _poll(self) -> None:
        """``poll``: run the callbacks of finished writes, in order, on the loop's thread (CallbackSink.poll).

        The writer thread schedules this itself, but a scheduled call waits for the end of the loop's pass
        over its sockets (about 1 ms under load); transports call it at each read, so devices are answered
        as soon as the loop next looks up from one socket.
        """
        if self._polling or not self._finished:  # a callback that reached a transport's read: the outer call
            return  # goes on in order; or nothing finished (most reads: one check, no bookkeeping)
        self._polling = True
        try:
            finished = self._finished
            while finished:
                done, result, exc = finished.popleft()
                done(result, exc)
        finally:
            self._polling = False


def _run(job: _Job) -> tuple[Callable[[Any, BaseException | None], None], Any, BaseException | None]:
    """The writer thread's work on one job: (done, result, exception); nothing of the job outlives the call."""
    work, _, done = job
    try:
        return done, work(), None
    except Exception as exc:  # handed to ``done``, which decides
        return done, None, exc


def _answer(future: asyncio.Future[Any], answer: Any) -> None:
    if not future.done():  # the awaiting task was cancelled; the write happened anyway
        future.set_result(answer)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled; the write happened anyway
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


def read_messages(
    path: Path, *, after_seq: int = 0, device: str | None = None, kinds: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Stored records in arrival order, as documented dicts (docs/records.md) plus their ``seq``."""
    for seq, payload in read_log(path, after_seq):
        record = orjson.loads(payload)
        if (device is None or record["device"] == device) and (kinds is None or record["kind"] in kinds):
            yield {"seq": seq, **record}
