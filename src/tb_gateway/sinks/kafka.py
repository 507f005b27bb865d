"""The Kafka sink: confluent-kafka (librdkafka), ``acks=all``, idempotent, key = device id.

The only module that imports the Kafka client. ``deliver`` produces every record of a batch and returns
once librdkafka has called back for each of them, so DELIVERED means the broker acknowledged the record on
all in-sync replicas. A background thread polls the producer and resolves each batch's asyncio future with
one ``call_soon_threadsafe`` per batch.

Per record: DELIVERED; REJECTED when Kafka will never take it (too large for the topic, invalid, not
authorized) — counted and logged, and it blocks nothing else; SINK_FAILED when delivery did not succeed
within ``delivery_timeout_ms`` (broker down, leader moving) — the spool wrapper keeps those.

Start-up never needs the broker: ``start`` probes it briefly and, when it is unreachable, says so once in
the log and reports itself down, so the spool takes the records until a replay gets through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from tb_gateway.config import Settings
from tb_gateway.metrics import Metrics
from tb_gateway.records import Record, RecordKind
from tb_gateway.sinks import kafka_records
from tb_gateway.sinks.base import Outcome

try:  # the per-record work in C (src/tb_gateway/_kafka_lane.c): encoding, the produce loop, delivery reports
    from tb_gateway._speedups import KafkaBatch as _KafkaBatch
    from tb_gateway._speedups import kafka_produce as _kafka_produce
except ImportError:  # pragma: no cover - built without a C compiler: the same in Python (_Batch, _delivered)
    _KafkaBatch = None  # type: ignore[misc,assignment]
    _kafka_produce = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Kafka will never take these records, however often they are sent.
PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._INVALID_ARG,
    }
)
POLL_S = 0.05  # the poll thread's wait; callbacks are served as they come, this only bounds shutdown
REFUSED = (BufferError, KafkaException)  # what produce() raises for one record; the rest of the batch goes on
STARTUP_PROBE_S = 2.0  # how long start-up waits to learn whether the broker is there
CLOSE_FLUSH_S = 3.0
SAFETY_MARGIN_S = 5.0  # librdkafka calls back within delivery.timeout.ms; this is for a stuck client


class _Batch:
    """One ``deliver`` call: its outcomes, filled in by the poll thread, and the future the caller awaits."""

    __slots__ = ("future", "lock", "loop", "outcomes", "remaining", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.outcomes = [Outcome.SINK_FAILED] * size
        self.remaining = size
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def settle(self, index: int, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes[index] = outcome
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _QuietLog:
    """librdkafka logs every failed reconnect; keep those at DEBUG — state changes are logged by the sink."""

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        log.debug(msg, *args)


class KafkaSink:
    name = "kafka"
    fast = _kafka_produce is not None  # the C produce loop and delivery reports; tests turn it off per sink

    def __init__(
        self,
        *,
        bootstrap_servers: Sequence[str],
        topics: Mapping[RecordKind, str],
        metrics: Metrics,
        linger_ms: int = 1,
        compression: str = "lz4",
        delivery_timeout_ms: int = 10_000,
        message_max_bytes: int = 1_000_000,
        max_in_flight: int = 3,
        startup_probe_s: float = STARTUP_PROBE_S,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.bootstrap = ",".join(bootstrap_servers)
        self.topics = dict(topics)
        self._metrics = metrics
        self._timeout_s = delivery_timeout_ms / 1000 + SAFETY_MARGIN_S
        self._probe_s = startup_probe_s
        self._config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": compression,
            "delivery.timeout.ms": delivery_timeout_ms,
            "request.timeout.ms": min(30_000, delivery_timeout_ms),
            # Records above the limit are refused at produce(), alone; batches never grow past it, so with
            # the limit at most the topics' max.message.bytes a big record never takes others down with it.
            "message.max.bytes": message_max_bytes,
            "batch.size": message_max_bytes,
            "partitioner": "murmur2_random",  # the Java client's partitioner: same key -> same partition
            "reconnect.backoff.max.ms": 1000,  # notice a restarted broker within a second
            "error_cb": self._on_error,
            "logger": _QuietLog(),
            **(extra_config or {}),
        }
        self._producer = Producer(self._config)
        self._down = False
        self._fatal = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._in_flight = 0

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> KafkaSink:
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topics={
                RecordKind.TELEMETRY: settings.kafka_topic_telemetry,
                RecordKind.ATTRIBUTES: settings.kafka_topic_attributes,
                RecordKind.CLAIM: settings.kafka_topic_device_events,
                RecordKind.DEVICE_STATE: settings.kafka_topic_device_events,
                RecordKind.RPC_REQUEST: settings.kafka_topic_rpc_requests,
                RecordKind.RPC_RESPONSE: settings.kafka_topic_rpc_responses,
            },
            metrics=metrics,
            linger_ms=settings.kafka_linger_ms,
            compression=settings.kafka_compression.value,
            delivery_timeout_ms=settings.kafka_delivery_timeout_ms,
            message_max_bytes=settings.kafka_message_max_bytes,
            max_in_flight=settings.kafka_max_in_flight_batches,
        )

    # --- lifecycle ---

    async def start(self) -> None:
        self._poller = threading.Thread(target=self._poll_forever, name="kafka-poll", daemon=True)
        self._poller.start()
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=self._probe_s)
        except KafkaException as exc:
            self._mark_down(f"no answer from {self.bootstrap} at start-up ({exc.args[0].str()})")

    async def run(self) -> None:
        """Nothing to do in the event loop: the poll thread serves librdkafka's callbacks."""

    async def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        # Short: the pipeline has flushed, so what is still unacknowledged is a replay chunk the spool keeps.
        left = await asyncio.to_thread(self._producer.flush, CLOSE_FLUSH_S)
        if left:
            log.warning("Kafka: %d records still unacknowledged at shutdown (the spool keeps them)", left)

    def health(self) -> dict[str, Any]:
        return {
            "status": "down" if self._down else "up",
            "bootstrap_servers": self.bootstrap,
            "batches_in_flight": self._in_flight,
        }

    # --- delivering ---

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        if not batch:
            return []
        if self._fatal:
            await self._rebuild()
        records = batch if type(batch) is list else list(batch)
        topics = [self.topics[record.kind] for record in records]
        self._in_flight += 1
        try:
            pending = self._produce(records, topics)
            # A timer resolving the future, not asyncio.timeout around a shield: the last delivery report
            # then resumes this task one loop pass sooner (a shield's callback is a pass of its own), and a
            # cancelled deliver only cancels this batch's future, whose late reports then change nothing.
            timer = asyncio.get_running_loop().call_later(self._timeout_s, _resolve, pending.future)
            try:
                await pending.future
            finally:
                timer.cancel()
            if pending.remaining:
                log.error("Kafka: no delivery report within %.0f s; treating the rest as failed", self._timeout_s)
        finally:
            self._in_flight -= 1
        outcomes: list[Outcome] = list(pending.outcomes)  # one C-level copy: no report lands half-way
        if self._down and Outcome.DELIVERED in outcomes:
            self._down = False
            log.info("Kafka at %s is reachable again", self.bootstrap)
        self._count(topics, outcomes)
        return outcomes

    def _produce(self, records: list[Record], topics: list[str]) -> _Batch | _KafkaBatch:
        """Produce every record; the answer's ``future`` resolves once each has its outcome."""
        loop = asyncio.get_running_loop()
        if _kafka_produce is not None and self.fast:
            pending = _KafkaBatch(
                loop,
                _resolve,
                loop.create_future(),
                [Outcome.SINK_FAILED] * len(records),
                Outcome.DELIVERED,
                self._metrics.kafka_delivery_latency,
                functools.partial(self._failed, records),
            )
            refused = _kafka_produce(self._producer.produce, records, topics, pending, kafka_records.encode, REFUSED)
            for index, exc in refused:
                pending.settle(index, self._refused(exc, records[index], topics[index]))
            return pending
        batch = _Batch(loop, len(records))
        produce = self._producer.produce
        for index, (record, topic) in enumerate(zip(records, topics, strict=True)):
            key, value, headers = kafka_records.encode(record)
            try:
                produce(
                    topic,
                    value,
                    key,
                    headers=headers,
                    on_delivery=functools.partial(self._delivered, batch, index, record),
                )
            except REFUSED as exc:
                batch.settle(index, self._refused(exc, record, topic))
        return batch

    def _refused(self, exc: BaseException, record: Record, topic: str) -> Outcome:
        """``produce`` raised: librdkafka's queue is full (the spool keeps the record), or Kafka said no."""
        if isinstance(exc, KafkaException):
            return self._judge(exc.args[0], record, topic)
        return Outcome.SINK_FAILED

    def _delivered(self, batch: _Batch, index: int, record: Record, err: KafkaError | None, msg: Any) -> None:
        """Delivery report, in the poll thread (without the C extension: ``DeliveryReport`` does this)."""
        if err is None:
            self._metrics.kafka_delivery_latency.observe(time.monotonic() - batch.started)
            batch.settle(index, Outcome.DELIVERED)
        else:
            batch.settle(index, self._failed([record], 0, err, msg))

    def _failed(self, records: list[Record], index: int, err: KafkaError, msg: Any) -> Outcome:
        """A failed delivery report's outcome, in the poll thread."""
        return self._judge(err, records[index], msg.topic())

    def _judge(self, err: KafkaError, record: Record, topic: str) -> Outcome:
        if err.code() in PERMANENT:
            log.warning(
                "Kafka rejected a %s record of device %s for topic %s for good: %s",
                record.kind.value,
                record.device.name,
                topic,
                err.str(),
            )
            return Outcome.REJECTED
        if err.fatal():
            self._fatal = True
        return Outcome.SINK_FAILED

    def _count(self, topics: list[str], outcomes: list[Outcome]) -> None:
        if outcomes.count(Outcome.DELIVERED) == len(outcomes):  # the common case: no pair per record
            for topic, n in Counter(topics).items():
                self._metrics.kafka_records.labels(topic=topic, result="delivered").inc(n)
            return
        tally = Counter(zip(topics, outcomes, strict=True))
        results = {Outcome.DELIVERED: "delivered", Outcome.REJECTED: "rejected"}
        for (topic, outcome), n in tally.items():
            self._metrics.kafka_records.labels(topic=topic, result=results.get(outcome, "failed")).inc(n)
        failed = tally.total() - sum(n for (_, o), n in tally.items() if o in results)
        if failed:
            log.debug("Kafka: %d of %d records not delivered in time", failed, len(outcomes))

    # --- the poll thread and broker state ---

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(POLL_S)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("Kafka producer failed for good (%s); it is rebuilt before the next batch", err.str())
            self._fatal = True
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_down(err.str())
        else:
            log.debug("Kafka: %s", err.str())

    def _mark_down(self, why: str) -> None:
        if not self._down:
            self._down = True
            log.warning("Kafka unreachable (%s); records are spooled until it is back", why)

    async def _rebuild(self) -> None:
        """After a fatal error (idempotence state lost) the producer is unusable: replace it."""
        old, self._producer = self._producer, Producer(self._config)
        self._fatal = False
        old.purge()
        await asyncio.to_thread(old.flush, self._timeout_s)  # serves the purged records' callbacks
