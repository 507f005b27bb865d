"""Downlink from Kafka: server-side RPC requests, shared attributes, client-side RPC replies.

One confluent-kafka consumer (group ``KAFKA_DOWNLINK_GROUP_ID``) reads the three topics; each record is
applied to the ``Downlink`` hub in the event loop. What goes back up (RPC outcomes and replies, client-side
RPC requests) leaves through the pipeline and the Kafka sink, so it gets the same durability and spool as
telemetry. Formats: docs/kafka-records.md, "Downlink records". A malformed record is counted
(``tb_gateway_downlink_consumed_total{result="invalid"}``), logged at most once a minute per topic, and
skipped: one bad record never blocks a partition.

Offsets are committed automatically once a batch has been handed to the hub, so a crash may lose at most
the requests of the last second; pending RPCs live in memory (docs/downlink.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message

from tb_gateway.config import Settings
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.shared_attributes import parse_change
from tb_gateway.errors import PayloadError
from tb_gateway.logs import Throttle
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity

if TYPE_CHECKING:
    from tb_gateway.downlink.router import Router

log = logging.getLogger(__name__)

POLL_S = 0.2  # one consume call's wait: bounds how long ``close`` takes to be noticed
BATCH = 500  # records per consume call


@dataclass(frozen=True, slots=True)
class DownlinkTopics:
    """The topics one consumer reads; ``None`` = not this consumer's (WORKERS=N splits them, see below)."""

    server_rpc: str | None
    shared_attributes: str | None
    client_rpc_replies: str | None


class _QuietLog:
    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        log.debug(msg, *args)


class KafkaDownlinkSource:
    name = "kafka-downlink"

    def __init__(
        self,
        downlink: Downlink,
        metrics: Metrics,
        *,
        bootstrap_servers: Sequence[str],
        group_id: str,
        topics: DownlinkTopics,
        extra_config: Mapping[str, Any] | None = None,
        router: Router | None = None,
    ) -> None:
        self._downlink = downlink
        self._router = router
        self._metrics = metrics
        self._group = group_id
        handlers: dict[str | None, Callable[[str, bytes | None], str]] = {
            topics.server_rpc: self._server_rpc,
            topics.shared_attributes: self._shared,
            topics.client_rpc_replies: self._client_reply,
        }
        self._handlers = {topic: handler for topic, handler in handlers.items() if topic is not None}
        self._consumer = Consumer(
            {
                "bootstrap.servers": ",".join(bootstrap_servers),
                "group.id": group_id,
                "auto.offset.reset": "earliest",  # a new gateway learns every device's shared attributes
                "enable.auto.commit": True,
                "topic.metadata.refresh.interval.ms": 10_000,  # notice topics created after start-up
                "reconnect.backoff.max.ms": 1000,
                "error_cb": self._on_error,
                "logger": _QuietLog(),
                **(extra_config or {}),
            }
        )
        self._closing = False
        self._invalid_log = Throttle(log, period_s=60.0)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        downlink: Downlink,
        metrics: Metrics,
        router: Router | None = None,
        process_name: str | None = None,
    ) -> list[KafkaDownlinkSource]:
        """One consumer for the three topics; with WORKERS=N each worker also reads shared attributes and
        client-RPC replies with a group of its own (every worker needs every shared attribute; a reply is
        taken by the worker whose id it carries), while server-side RPCs stay in the shared group, read once
        (docs/downlink.md, "More than one process"). With the Redis router (``process_name``: stable for a
        DATA_DIR and worker index) replies are read once too and routed by their id, and shared attributes
        are read by every process of every instance in a group named after it."""
        s, group = settings, settings.kafka_downlink_group_id
        if router is not None and process_name is not None:
            split = [
                (group, DownlinkTopics(s.kafka_topic_server_rpc, None, s.kafka_topic_client_rpc_replies)),
                (f"{group}-{process_name}", DownlinkTopics(None, s.kafka_topic_shared_attributes, None)),
            ]
        elif s.worker_index is None:
            split = [
                (
                    group,
                    DownlinkTopics(
                        s.kafka_topic_server_rpc, s.kafka_topic_shared_attributes, s.kafka_topic_client_rpc_replies
                    ),
                )
            ]
        else:
            split = [
                (group, DownlinkTopics(s.kafka_topic_server_rpc, None, None)),
                (
                    f"{group}-worker-{s.worker_index}",
                    DownlinkTopics(None, s.kafka_topic_shared_attributes, s.kafka_topic_client_rpc_replies),
                ),
            ]
        return [
            cls(
                downlink, metrics, bootstrap_servers=s.kafka_bootstrap_servers, group_id=g, topics=topics, router=router
            )
            for g, topics in split
        ]

    async def run(self) -> None:
        self._consumer.subscribe(list(self._handlers))
        try:
            while not self._closing:
                messages = await asyncio.to_thread(self._consumer.consume, BATCH, POLL_S)
                for message in messages:
                    self._apply(message)
        finally:
            await asyncio.to_thread(self._consumer.close)

    def close(self) -> None:
        self._closing = True

    # --- records ---

    def _apply(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.debug("Kafka downlink: %s", error.str())
            return
        topic = message.topic() or ""
        raw_key = message.key()
        key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else (raw_key or "")
        value = message.value()
        try:
            result = self._handlers[topic](key, value if isinstance(value, bytes) or value is None else value.encode())
        except (PayloadError, orjson.JSONDecodeError, KeyError) as exc:
            self._invalid_log.warning(topic, "skipped an invalid record on %s (key %r): %s", topic, key, exc)
            result = "invalid"
        self._metrics.downlink_consumed.labels(topic=topic, result=result).inc()

    def _server_rpc(self, key: str, value: bytes | None) -> str:
        body = _object(value)
        device_id = _device_id(key, body)
        method = body.get("method")
        if not isinstance(method, str) or not method:
            raise PayloadError("'method' must be a non-empty string")
        oneway = body.get("oneway", False)
        timeout_ms = _optional_int(body, "timeout")
        expires_at = _optional_int(body, "expirationTime")
        request_id = body.get("requestId")
        if not isinstance(oneway, bool) or (request_id is not None and not isinstance(request_id, str | int)):
            raise PayloadError("'oneway' must be a boolean and 'requestId' a string or an integer")
        name = body.get("device")
        identity = DeviceIdentity(device_id, name) if isinstance(name, str) and name else None
        self._downlink.send_rpc(
            device_id,
            method,
            body.get("params"),
            oneway=oneway,
            timeout_ms=timeout_ms,
            expires_at=expires_at,
            request_id=None if request_id is None else str(request_id),
            device=identity,
        )
        return "applied"

    def _shared(self, key: str, value: bytes | None) -> str:
        document = None if value is None else orjson.loads(value)
        device_id = _device_id(key, document if isinstance(document, dict) else {})
        self._downlink.change_shared(device_id, parse_change(document))
        return "applied"

    def _client_reply(self, key: str, value: bytes | None) -> str:
        body = _object(value)
        request_id = body.get("id")
        if not isinstance(request_id, str) or "response" not in body:
            raise PayloadError('expected {"id": "<the request\'s id>", "response": ...}')
        device_id = key or body.get("device_id")
        if not self._downlink.owns_client_rpc(request_id):
            if self._router is not None and self._router.client_reply(request_id, body["response"], device_id):
                return "forwarded"  # to the process whose id the request id carries
            return "other_worker"  # WORKERS=N without Redis: every worker reads the replies; the one it names takes it
        matched = self._downlink.client_rpc_reply(request_id, body["response"], device_id or None)
        return "applied" if matched else "unmatched"

    def _on_error(self, err: KafkaError) -> None:
        log.debug("Kafka downlink consumer: %s", err.str())


def _object(value: bytes | None) -> dict[str, Any]:
    document = orjson.loads(value) if value is not None else None
    if not isinstance(document, dict):
        raise PayloadError("expected a JSON object")
    return document


def _device_id(key: str, body: Mapping[str, Any]) -> str:
    """The record key is the device id (as on every uplink topic); ``device_id`` in the value also works."""
    device_id = key or body.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise PayloadError("no device: the key (or 'device_id') must be the device id")
    return device_id


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PayloadError(f"'{name}' must be a positive integer (milliseconds)")
    return value
