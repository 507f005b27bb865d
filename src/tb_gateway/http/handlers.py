"""What each endpoint answers, in terms of ``DeviceApi`` only (the connection decides framing and order).

A handler returns a ``Reply`` at once, or ``(future, finish)`` when the answer waits for something (the
pipeline's delivery confirmation; later, the downlink's long polls): the connection calls
``finish(request, future.result())`` once the future is done and writes what it returns.

Status codes (docs/device-api.md): DELIVERED -> 200; a bad payload -> 400 with ``{"error": "<where, what>"}``
(ThingsBoard answers 500 here); QUEUE_FULL / SPOOL_FULL / SHUTTING_DOWN -> 503 + Retry-After; RATE_LIMITED
-> 429 + Retry-After (seconds until the device may send that message again; docs/scale-out.md), or 413 when
it can never pass (more data points than the limit allows at once); REJECTED / SINK_FAILED -> 500, each with
``{"error": "<outcome>"}``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from typing import Any

from tb_gateway.auth import AccessToken
from tb_gateway.device_api import DeviceApi
from tb_gateway.errors import PayloadError
from tb_gateway.http.routes import Endpoint, Match, query_values
from tb_gateway.http.wire import Answer, Reply, error, json_answer
from tb_gateway.normalize import key_list
from tb_gateway.ratelimit import NEVER_PASSES, ceil_seconds
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

HTTP = Transport.HTTP
OVERLOAD = frozenset({Outcome.QUEUE_FULL, Outcome.SPOOL_FULL, Outcome.SHUTTING_DOWN})


class Request:
    """One request, queued as soon as its headers are complete (before its body)."""

    __slots__ = (
        "authenticated",
        "body",
        "closed",
        "complete",
        "credentials",
        "device",
        "discard",
        "done_at",
        "expect",
        "fatal",
        "handler",
        "match",
        "persist",
        "refusal",
        "size",
    )

    def __init__(
        self,
        match: Match | None,
        credentials: AccessToken | None,
        persist: int,
        handler: Handler | None = None,
        takes_body: bool = False,
    ) -> None:
        self.match = match
        self.credentials = credentials
        self.persist = persist
        self.handler = handler
        self.authenticated = credentials is None
        self.device: DeviceIdentity | None = None
        self.refusal: Reply | None = None  # the answer decided without a handler
        self.fatal = False  # answer, then close the connection
        self.discard = not takes_body
        self.body: bytes | bytearray = b""
        self.size = 0
        self.complete = False
        self.expect = False
        self.done_at = 0.0  # perf_counter when the last byte arrived: ack latency starts there
        self.closed: asyncio.Future[None] | None = None  # done when the client left (EOF): ends a long poll


Finish = Callable[[Request, Any], Reply]
Pending = tuple["asyncio.Future[Any]", Finish]
Handler = Callable[[Request], "Reply | Pending"]


class Handlers:
    def __init__(self, api: DeviceApi, health: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        self.api = api
        self.health_of = health
        self.retry_after = b"Retry-After: %d\r\n" % api.settings.retry_after_seconds
        self.ack_latency = api.metrics.ack_latency.labels(transport=HTTP.value)
        self.table: dict[Endpoint, Handler] = {
            Endpoint.TELEMETRY: functools.partial(self.device_message, RecordKind.TELEMETRY),
            Endpoint.ATTRIBUTES: functools.partial(self.device_message, RecordKind.ATTRIBUTES),
            Endpoint.CLAIM: functools.partial(self.device_message, RecordKind.CLAIM),
            Endpoint.ATTRIBUTE_REQUEST: self.attribute_request,
            Endpoint.HEALTH: self.health,
        }
        if api.downlink is not None:  # long polls, RPC replies, client RPC (http/downlink.py)
            from tb_gateway.http.downlink import HttpDownlink

            self.table.update(HttpDownlink(api.downlink, api.refused, self.retry_after).handlers())
        for endpoint in Endpoint:  # a gateway built without the downlink (unit tests) answers 404
            self.table.setdefault(endpoint, lambda request: error(404, "not served"))

    def overloaded(self, message: str) -> Answer:
        return error(503, message, self.retry_after)

    def device_message(self, kind: RecordKind, request: Request) -> Reply | Pending:
        device = request.device
        assert device is not None
        body = request.body if type(request.body) is bytes else bytes(request.body)
        try:
            result = self.api.post(device, kind, body, HTTP)
        except PayloadError as exc:  # already counted and logged
            return error(400, str(exc))
        if isinstance(result, Outcome):  # answered at once; a refusal is already counted
            return self.outcome(request, result)
        return result, self.delivered

    def delivered(self, request: Request, outcome: Outcome) -> Reply:
        assert request.device is not None
        self.api.settle(request.device, HTTP, outcome)
        return self.outcome(request, outcome)

    def outcome(self, request: Request, outcome: Outcome) -> Reply:
        self.ack_latency.observe(time.perf_counter() - request.done_at)
        if outcome is Outcome.DELIVERED:
            return 200
        if outcome in OVERLOAD:
            return self.overloaded(outcome.value)
        if outcome is Outcome.RATE_LIMITED:
            assert request.device is not None
            wait = self.api.rate_limit_wait_s(request.device)
            if wait == math.inf:  # more data points than the limit lets through at once: waiting cannot help
                return error(413, NEVER_PASSES)
            return too_many(outcome.value, wait)
        return error(500, outcome.value)

    def attribute_request(self, request: Request) -> Reply:
        match, device = request.match, request.device
        assert match is not None and device is not None
        params = query_values(match.query)
        client = key_list(params.get("clientKeys") or None)  # empty = absent, as in ThingsBoard
        shared = key_list(params.get("sharedKeys") or None)
        return json_answer(200, self.api.attribute_request(device, client, shared))

    def health(self, request: Request) -> Reply:
        ok, body = self.health_of()
        return json_answer(200 if ok else 503, body)


def too_many(message: str, wait_s: float) -> Answer:
    """429 for a rate-limited device or a blocked address, with when to come back."""
    return error(429, message, b"Retry-After: %d\r\n" % ceil_seconds(wait_s))
