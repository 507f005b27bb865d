"""ThingsBoard's device API, once, for every transport (hypercorn's lesson: one vocabulary).

Transports decode their protocol and call these methods; they never branch on payload shapes, never touch
the pipeline or the attribute store directly, and only map the answers to their own wire codes:

=====================  ==================  ================  ===============  ==================
answer                 HTTP                CoAP              MQTT 5           MQTT 3.1.1
=====================  ==================  ================  ===============  ==================
DELIVERED              200                 2.01              PUBACK 0x00      PUBACK
PayloadError           400 + JSON error    4.00              PUBACK 0x99      close
QUEUE_FULL/SPOOL_FULL  503 + Retry-After   5.03 + Max-Age    PUBACK 0x97      close
REJECTED               500 ... see docs    5.00              PUBACK 0x80      close
RATE_LIMITED           429 + Retry-After   4.29 + Max-Age    PUBACK 0x96      close
RATE_LIMITED, never    413                 4.13              PUBACK 0x96      close
=====================  ==================  ================  ===============  ==================

Per-device rate limits (``ratelimit.py``) are checked after parsing (telemetry data points are counted) and
before admission: a refused message takes no queue slot. ``rate_limit_wait_s`` gives Retry-After / Max-Age.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from tb_gateway.attributes import CLIENT, AttributeStore
from tb_gateway.auth import AuthService, Credentials
from tb_gateway.clock import now_ms
from tb_gateway.config import Settings
from tb_gateway.construct import constructor
from tb_gateway.errors import PayloadError
from tb_gateway.logs import Throttle
from tb_gateway.metrics import Metrics
from tb_gateway.normalize import ValueRules, attributes, parse_json, telemetry
from tb_gateway.pipeline import Pipeline, Ticket, when_settled
from tb_gateway.ratelimit import configured, format_limit
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

try:  # the common telemetry message in one C call (_lanes.c); DeviceApi._post is the reference
    from tb_gateway._speedups import Ingest
except ImportError:  # pragma: no cover - a build without a C compiler runs _post alone
    Ingest = None  # type: ignore[misc,assignment]

_record = constructor(Record)  # Record(...) at a tenth of the cost (construct.py)

if TYPE_CHECKING:
    from tb_gateway.downlink.hub import Downlink

log = logging.getLogger(__name__)

Groups = list[tuple[int, dict[str, Any]]]
_SESSION_LIMIT_KEYS = ("messages", "telemetryMessages", "telemetryDataPoints")  # getSessionLimits, in LIMIT_NAMES order


class PostMessage(Protocol):
    def __call__(
        self,
        device: DeviceIdentity,
        kind: RecordKind,
        payload: bytes,
        transport: Transport,
        now_ms: int | None = None,
        *,
        activity_seen: bool = False,
    ) -> Outcome | asyncio.Future[Outcome]: ...


class DeviceApi:
    def __init__(
        self,
        settings: Settings,
        auth: AuthService,
        pipeline: Pipeline,
        attribute_store: AttributeStore,
        metrics: Metrics,
        clock_ms: Callable[[], int] = now_ms,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.pipeline = pipeline
        self.attributes = attribute_store
        self.metrics = metrics
        self._clock_ms = clock_ms
        # The clock ``post`` stamps records with: a transport reading many messages at once asks it once
        # per read (the function itself, not a method around it: one call fewer on every read).
        self.now_ms = clock_ms
        self.downlink: Downlink | None = None  # set by app.py; RPC, shared attributes, device state
        self._clock_s = clock_s
        # known_device(credentials, transport, address): the device when the cache knows it and the address may
        # connect; None (nothing counted) means go the whole way through authenticate_cached. A fast lane's
        # first question, once per request: the auth service's method itself (a StrEnum transport is its value)
        self.known_device: Callable[[Credentials, Transport, str | None], DeviceIdentity | None] = auth.cached_identity
        self.limiter = configured(settings)
        limits = self.limiter.limits if self.limiter is not None else ((), (), ())
        self._limit_specs = [format_limit(limit) for limit in limits]
        # (device id, clock_s, wait) of the latest refusal: what ``rate_limit_wait_s`` answers for it
        self._last_refusal: tuple[str, float, float] = ("", 0.0, 0.0)
        self._rules = ValueRules(settings.json_type_cast_enabled, settings.json_max_string_value_length)
        self._received = {t: metrics.messages_received.labels(transport=t.value) for t in Transport}
        self._refusal_log = Throttle(log, period_s=60.0)
        self._parsers: dict[RecordKind, Callable[[bytes, int], Groups]] = {
            RecordKind.TELEMETRY: lambda payload, now: telemetry(payload, now, self._rules),
            RecordKind.ATTRIBUTES: lambda payload, now: [(now, attributes(payload, self._rules))],
            RecordKind.CLAIM: lambda payload, now: [(now, claim(payload))],
        }
        # post(device, kind, payload, transport, now_ms=None, *, activity_seen=False): see _post. With the C
        # extension, a telemetry message that parses into one group (nearly all) takes one C call that does
        # what _post does; anything else it hands to _post untouched (_lanes.c, tests/test_lanes.py).
        self.post: PostMessage = self._post
        if Ingest is not None:
            self.post = Ingest(
                self,
                self._post,
                self._admit,
                self._received,
                self._clock_ms,
                _record,
                RecordKind.TELEMETRY,
                orjson.loads,
                Ticket,
                Outcome.DELIVERED,
                self._rules.type_cast,
                self._rules.max_string_length,
            )

    async def authenticate(
        self,
        credentials: Credentials,
        transport: Transport,
        address: str | None = None,
        fallback: Credentials | None = None,
    ) -> DeviceIdentity | None:
        """Pass the peer's ``address`` for brute-force protection: a blocked one raises ``AddressBlocked``."""
        return await self.auth.authenticate(credentials, transport.value, address, fallback)

    def authenticate_cached(
        self, credentials: Credentials, transport: Transport, address: str | None = None
    ) -> tuple[bool, DeviceIdentity | None]:
        """``(True, identity or None)`` when the cache knows the answer, else ``(False, None)``: then await
        ``authenticate``. Lets a per-request transport answer without a task switch on the hot path."""
        return self.auth.cached(credentials, transport.value, address)

    def _post(
        self,
        device: DeviceIdentity,
        kind: RecordKind,
        payload: bytes,
        transport: Transport,
        now_ms: int | None = None,
        *,
        activity_seen: bool = False,
    ) -> Outcome | asyncio.Future[Outcome]:
        """Normalize one device message and admit it to the pipeline.

        Raises ``PayloadError`` (already counted and logged) for a payload of the wrong syntax or shape.
        Returns an ``Outcome`` when answered at once (refused, or nothing to store), else a future that
        resolves once every record is durable. A transport that reads many messages at once passes the
        read's ``now_ms``, and ``activity_seen`` when it already told the downlink about the read (MQTT).
        """
        self._received[transport].value += 1  # CounterChild.inc() without its frame: once per message
        now = self._clock_ms() if now_ms is None else now_ms
        if self.downlink is not None and not activity_seen:
            self.downlink.activity(device, transport, now)
        try:
            if kind is RecordKind.TELEMETRY:
                groups = telemetry(payload, now, self._rules)
            else:
                groups = self._parsers[kind](payload, now)
        except PayloadError as exc:
            self.refused(device, transport, "bad_payload", str(exc))
            raise
        if len(groups) == 1:  # nearly every message: no comprehension, whose frame costs a call
            ts, values = groups[0]
            records = [_record(device, kind, ts, values, transport, now)] if values else []
        else:
            records = [_record(device, kind, ts, values, transport, now) for ts, values in groups if values]
        if self.limiter is not None and self._over_limit(device, kind, records, transport):
            return Outcome.RATE_LIMITED
        return self._admit(device, kind, records, transport)

    def _admit(
        self, device: DeviceIdentity, kind: RecordKind, records: list[Record], transport: Transport
    ) -> Outcome | asyncio.Future[Outcome]:
        """The records of one message into the pipeline (the C ``Ingest`` calls this when the pipeline is
        not in its everyday state: closing, full, not yet running)."""
        admitted = self.pipeline.submit(records)
        if isinstance(admitted, Outcome):
            if not admitted.delivered:
                self.refused(device, transport, admitted.value)
            return admitted
        if kind is RecordKind.ATTRIBUTES:
            when_settled(admitted, lambda done: self._attributes_delivered(done, records))
        return admitted

    def _over_limit(
        self, device: DeviceIdentity, kind: RecordKind, records: list[Record], transport: Transport
    ) -> bool:
        assert self.limiter is not None
        points = sum(len(record.values) for record in records) if kind is RecordKind.TELEMETRY else None
        now = self._clock_s()
        exceeded = self.limiter.try_acquire(device.id, now, points)
        if exceeded is None:
            return False
        self._last_refusal = (device.id, now, exceeded.retry_after_s)
        self.metrics.rate_limited.labels(transport=transport.value, limit=exceeded.limit).inc()
        self.refused(device, transport, Outcome.RATE_LIMITED.value, f"{exceeded.limit} limit {exceeded.spec}")
        return True

    def rate_limit_wait_s(self, device: DeviceIdentity) -> float:
        """Seconds until ``device`` may send again the message ``post`` just refused with RATE_LIMITED (its
        data points counted): Retry-After / Max-Age of a 429 / 4.29. ``math.inf`` when that message can never
        pass (more data points than a bucket holds: the transports answer 413 / 4.13). For a device with no
        refusal just now: the wait for a message of one data point (0 when it may send now)."""
        if self.limiter is None:
            return 0.0
        now = self._clock_s()
        device_id, refused_at, wait = self._last_refusal
        if device_id == device.id:
            return max(0.0, wait - max(0.0, now - refused_at))
        return self.limiter.wait_s(device.id, now)

    def _attributes_delivered(self, done: asyncio.Future[Outcome], records: list[Record]) -> None:
        if not done.cancelled() and done.result().delivered:
            for record in records:
                self.attributes.update(record.device.id, CLIENT, record.values)

    def settle(self, device: DeviceIdentity, transport: Transport, outcome: Outcome) -> None:
        """Count and log a refusal that a transport learned of from a resolved future."""
        if not outcome.delivered:
            self.refused(device, transport, outcome.value)

    def refused(self, device: DeviceIdentity | None, transport: Transport, reason: str, detail: str = "") -> None:
        """Every refusal is counted; it is logged once per device, reason and transport per minute, not per
        message."""
        self.metrics.refused(transport.value, reason)
        name = device.name if device is not None else "-"
        self._refusal_log.warning(
            (name, reason, transport),  # per transport too: one's refusals must not hide another's
            "refused a message from device %s over %s: %s%s",
            name,
            transport.value,
            reason,
            f" ({detail})" if detail else "",
        )

    def attribute_request(
        self, device: DeviceIdentity, client_keys: list[str] | None, shared_keys: list[str] | None
    ) -> dict[str, Any]:
        return self.attributes.request(device.id, client_keys, shared_keys)

    def session_limits(self) -> dict[str, Any]:
        """The local answer to the ``getSessionLimits`` client-side RPC (spec §1.9)."""
        return {
            "maxPayloadSize": self.settings.max_payload_size,
            "maxInflightMessages": self.settings.mqtt_max_inflight,
            "rateLimits": dict(zip(_SESSION_LIMIT_KEYS, self._limit_specs, strict=True)),
        }


def claim(payload: bytes) -> dict[str, Any]:
    """Claim body is optional: empty -> secretKey "" and durationMs 0 (spec §1.10)."""
    if not payload.strip():
        return {"secretKey": "", "durationMs": 0}
    document = parse_json(payload)
    if not isinstance(document, dict):
        raise PayloadError("claim: expected a JSON object")
    secret = document.get("secretKey", "")
    duration = document.get("durationMs", 0)
    if not isinstance(secret, str) or isinstance(duration, bool) or not isinstance(duration, int):
        raise PayloadError("claim: secretKey must be a string and durationMs an integer")
    return {"secretKey": secret, "durationMs": duration}


def json_error(message: str) -> bytes:
    return orjson.dumps({"error": message})
