"""The CoAP transport: a thin asyncio adapter around the sans-IO ``Endpoint`` plus ThingsBoard's CoAP device
API routes (spec §4, docs/coap.md). It talks only to ``DeviceApi``.

The adapter reads the clock, moves datagrams between the socket and the endpoint, arms one timer from
``Endpoint.get_timer()`` and maps requests to ``DeviceApi`` calls. A POST is answered 2.01 only once the
pipeline's future resolved DELIVERED (DESIGN.md §4): piggybacked in the ACK when that takes less than
COAP_PIGGYBACK_TIMEOUT_MS, otherwise as a separate response after the endpoint's empty ACK.

Speed: almost every request finds its token in the auth cache, which answers synchronously
(``known_device``, ``authenticate_cached``), so the handler runs inline; only a cache miss, which has to
await a credential source, runs in a Task (a real one: sources such as Redis use ``asyncio.timeout``, which
needs the current task). The pipeline future is then followed with a done callback, not an awaiting task.
That keeps the hot path free of task creation and scheduling. With the C extension the common request's
whole way (the endpoint's intake, the route, ``DeviceApi.post``, the piggybacked 2.01) is ``CoapLane``
(``_lanes.c``); it hands everything else to the methods below at the point the Python path would be.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, NamedTuple

import orjson

from tb_gateway.auth import AccessToken
from tb_gateway.coap.codec import Code, ContentFormat, Option, Options, encode_uint
from tb_gateway.coap.downlink import CoapDownlink
from tb_gateway.coap.endpoint import (
    ANSWERED,
    PENDING,
    Endpoint,
    EndpointConfig,
    Event,
    Exchange,
    NotificationAcknowledged,
    NotificationTimedOut,
    ObservationCancelled,
    RequestReceived,
    RequestRefused,
    ResponseTimedOut,
    request_received,
)
from tb_gateway.coap.sockets import Datagrams, DatagramSocket, open_socket
from tb_gateway.device_api import DeviceApi
from tb_gateway.downlink.sessions import Feature
from tb_gateway.errors import AddressBlocked, CredentialsUnavailable, PayloadError
from tb_gateway.pipeline import Ticket, when_settled
from tb_gateway.ratelimit import NEVER_PASSES, ceil_seconds
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

try:  # the common request's whole path in C (_lanes.c)
    from tb_gateway._speedups import CoapLane, maker
except ImportError:  # pragma: no cover - built without a C compiler: every request takes the Python path
    CoapLane = maker = None  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

COAP = Transport.COAP
MAX_PENDING = 10_000  # requests admitted but not yet answered (auth waits included); beyond it: 5.03
ROUTE_CACHE = 10_000  # distinct (method, options) request shapes remembered; a flood of made-up ones refills it
_JSON = ((Option.CONTENT_FORMAT, encode_uint(ContentFormat.JSON)),)

# Outcome of a device message -> CoAP response code (device_api's table); overload refusals get Max-Age.
OUTCOME_CODES = {
    Outcome.DELIVERED: Code.CREATED,
    Outcome.QUEUE_FULL: Code.SERVICE_UNAVAILABLE,
    Outcome.SPOOL_FULL: Code.SERVICE_UNAVAILABLE,
    Outcome.SHUTTING_DOWN: Code.SERVICE_UNAVAILABLE,
    Outcome.REJECTED: Code.INTERNAL_SERVER_ERROR,
    Outcome.SINK_FAILED: Code.INTERNAL_SERVER_ERROR,
    Outcome.RATE_LIMITED: Code.TOO_MANY_REQUESTS,  # answered with Max-Age in ``post``
}

Handler = Callable[["CoapServer", Exchange, DeviceIdentity], None]

# Exchange(addr, msg, now) built by the C lane: its slots, filled in this order (test_coap_lane.py compares)
EXCHANGE_FIELDS = (
    "addr",
    "mid",
    "token",
    "code",
    "options",
    "payload",
    "confirmable",
    "received_at",
    "state",
    "deadline",
    "reply",
    "block1",
    "block2",
    "observation",
)
_EXCHANGE = None if maker is None else maker(Exchange, EXCHANGE_FIELDS, ())


class Refusal(NamedTuple):
    """A request refused by its path, method and options alone; ``reason`` None is a missing token (4.01)."""

    code: int
    reason: str | None
    payload: bytes = b""


class CoapServer:
    name = "coap"

    def __init__(
        self,
        api: DeviceApi,
        *,
        host: str | None = None,
        port: int | None = None,
        config: EndpointConfig | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        settings = api.settings
        self.api = api
        self.host = settings.coap_bind_address if host is None else host
        self.port = settings.coap_bind_port if port is None else port
        self.endpoint = Endpoint(
            config
            or EndpointConfig(
                piggyback_timeout_s=settings.coap_piggyback_timeout_ms / 1000,
                max_body_bytes=settings.max_payload_size,
                observer_check_s=settings.coap_observer_check_seconds,
            )
        )
        self._max_payload = self.endpoint.config.max_body_bytes
        self._max_pending = max_pending
        self._retry_after = ((Option.MAX_AGE, encode_uint(settings.retry_after_seconds)),)
        self._too_large = ((Option.SIZE1, encode_uint(self._max_payload)),)
        self._latency = api.metrics.ack_latency.labels(transport=COAP.value)
        self._socket: DatagramSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flush_scheduled = False
        self._pending = 0
        self._idle: asyncio.Event | None = None  # set by ``drain``: wakes it when the last answer is out
        self._accepting = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._routes: dict[tuple[int, Options], tuple[Any, AccessToken | None]] = {}
        # Observe on rpc / attributes, RPC replies, client RPC (coap/downlink.py, docs/downlink.md)
        self.downlink = CoapDownlink(self, api.downlink) if api.downlink is not None else None
        # the C lane (module docstring): a POST of a device message, not a duplicate, with only Uri-Path and
        # Content-Format options, from a device the auth cache knows; it hands everything else to
        # _receive_one, _on_request, _posted, _post_failed and _delivered
        self._lane = (
            None
            if CoapLane is None
            else CoapLane(
                self,
                self.endpoint,
                api,
                _EXCHANGE,
                request_received,
                PENDING,
                ANSWERED,
                COAP,
                Outcome.DELIVERED,
                Ticket,
                when_settled,
                ROUTE_CACHE,
            )
        )
        self._dispatch: dict[type, Callable[[Any], None]] = {
            RequestReceived: self._on_request,
            RequestRefused: self._refused,
            ObservationCancelled: self.downlink.cancelled if self.downlink else self._ignore,
            NotificationAcknowledged: self.downlink.acknowledged if self.downlink else self._ignore,
            NotificationTimedOut: self._ignore,
            ResponseTimedOut: self._ignore,
        }

    # ------------------------------------------------------------------ Server protocol

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        reuse_port = self.api.settings.workers > 1
        self._socket = await open_socket(self.host, self.port, self.datagrams_received, reuse_port=reuse_port)
        self.port = self._socket.port
        log.info("CoAP listening on %s:%d/udp", self.host, self.port)

    def stop_accepting(self) -> None:
        """UDP has no listening socket to close: new requests are refused with 5.03, admitted ones answered."""
        self._accepting = False

    async def drain(self) -> None:
        """Wait until every admitted request is answered, then close the socket (also when cancelled by the
        composition root's timeout)."""
        self._accepting = False
        try:
            if self._pending > 0:
                self._idle = asyncio.Event()
                await self._idle.wait()
        finally:
            self._flush()
            for task in list(self._tasks):
                task.cancel()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ socket -> endpoint -> socket

    def datagrams_received(self, datagrams: Datagrams) -> None:
        assert self._loop is not None
        self.api.pipeline.poll()  # answers whose batch is durable go out now, not at the end of this pass
        now = self._loop.time()
        if self._lane is not None:
            self._lane.receive(datagrams, now)  # the loop below, the common request taken in C
        else:
            receive, dispatch = self.endpoint.receive_datagram, self._dispatch
            for data, addr in datagrams:
                for event in receive(data, addr, now):
                    dispatch[type(event)](event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _receive_one(self, data: bytes, addr: Any, now: float) -> None:
        """A datagram the C lane does not take: the endpoint's and the routes' Python path."""
        for event in self.endpoint.receive_datagram(data, addr, now):
            self._dispatch[type(event)](event)

    def _flush(self) -> None:
        """Send what the endpoint queued and re-arm the timer: once per loop iteration, however many
        datagrams were read and answers resolved in it."""
        self._flush_scheduled = False
        sock, loop = self._socket, self._loop
        if sock is None or loop is None:
            return
        endpoint = self.endpoint
        sock.send(endpoint.datagrams_to_send(0.0))
        when = endpoint.get_timer()
        if when is None or (self._timer is not None and self._timer_at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._timer = None
        dispatch = self._dispatch
        for event in self.endpoint.handle_timer(self._loop.time()):
            dispatch[type(event)](event)
        self._flush()

    def _ignore(self, event: Event) -> None:
        pass

    def _refused(self, event: RequestRefused) -> None:
        """The endpoint refused (and answered) a request itself: bad option, Block1 error, proxying."""
        self.api.refused(None, COAP, event.reason)

    # ------------------------------------------------------------------ ThingsBoard routes

    def _on_request(self, event: RequestReceived) -> None:
        exchange = event.exchange
        self._pending += 1
        if not self._accepting or self._pending > self._max_pending:
            self.api.refused(None, COAP, "overloaded" if self._accepting else "shutting_down")
            self._answer(exchange, Code.SERVICE_UNAVAILABLE, options=self._retry_after)
            return
        key = (exchange.code, exchange.options)  # a device repeats the same request shape: routed once
        route = self._routes.get(key)
        if route is None:
            route = _route(exchange)
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            self._routes[key] = route
        handler, credentials = route
        if credentials is None:  # a refusal decided by the path, method and options alone
            self._refuse_route(exchange, handler)
            return
        if len(exchange.payload) > self._max_payload:
            self.api.refused(None, COAP, "too_large")
            self._answer(exchange, Code.REQUEST_ENTITY_TOO_LARGE, options=self._too_large)
            return
        address = exchange.addr[0]
        device = self.api.known_device(credentials, COAP, address)
        if device is not None:  # the hot path: a device the auth cache knows, answered without a coroutine
            self._handle(exchange, handler, device)
            return
        try:
            known, device = self.api.authenticate_cached(credentials, COAP, address)
        except AddressBlocked as exc:
            self._address_blocked(exchange, exc)
            return
        if known:
            self._handle(exchange, handler, device)
        else:
            self._spawn(self._serve(exchange, credentials, handler))

    def _refuse_route(self, exchange: Exchange, refusal: Refusal) -> None:
        if refusal.reason is None:  # no token at all: an authentication failure, like an unknown one
            self.api.metrics.auth_failures.labels(transport=COAP.value).inc()
        else:
            self.api.refused(None, COAP, refusal.reason)
        self._answer(exchange, refusal.code, refusal.payload)

    def refuse(
        self, exchange: Exchange, device: DeviceIdentity | None, code: int, reason: str, payload: bytes = b""
    ) -> None:
        """Answer a refusal decided by a handler, counted in tb_gateway_refusals_total."""
        self.api.refused(device, COAP, reason)
        self._answer(exchange, code, payload)

    def _address_blocked(self, exchange: Exchange, exc: AddressBlocked) -> None:
        """Brute-force protection: "too many", with how long (docs/scale-out.md)."""
        self.api.refused(None, COAP, "address_blocked")
        self._answer(exchange, Code.TOO_MANY_REQUESTS, options=_max_age(exc.retry_after_s))

    async def _serve(self, exchange: Exchange, credentials: AccessToken, handler: Handler) -> None:
        try:
            device = await self.api.authenticate(credentials, COAP, exchange.addr[0])
        except AddressBlocked as exc:
            self._address_blocked(exchange, exc)
            return
        except CredentialsUnavailable:
            self.api.refused(None, COAP, "auth_unavailable")
            self._answer(exchange, Code.SERVICE_UNAVAILABLE, options=self._retry_after)
            return
        except Exception:
            log.exception("CoAP request failed while authenticating")
            self.api.metrics.errors.labels(component="coap").inc()
            self._answer(exchange, Code.INTERNAL_SERVER_ERROR)
            return
        self._handle(exchange, handler, device)

    def _handle(self, exchange: Exchange, handler: Handler, device: DeviceIdentity | None) -> None:
        if device is None:
            self._answer(exchange, Code.UNAUTHORIZED)
            return
        try:
            handler(self, exchange, device)
        except Exception:
            log.exception("CoAP request handler failed")
            self.api.metrics.errors.labels(component="coap").inc()
            if exchange.state != ANSWERED:
                self._answer(exchange, Code.INTERNAL_SERVER_ERROR)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a credential lookup in a Task: never stepped inline, where ``asyncio.current_task()`` would be
        None (``asyncio.timeout`` raises then)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def post(self, exchange: Exchange, device: DeviceIdentity, kind: RecordKind) -> None:
        try:
            admitted = self.api.post(device, kind, exchange.payload, COAP)
        except PayloadError as exc:
            self._answer(exchange, Code.BAD_REQUEST, str(exc).encode()[:256])
            return
        if isinstance(admitted, Outcome):
            self._posted(exchange, device, admitted)
        else:
            when_settled(admitted, partial(self._delivered, exchange, device))

    def _post_route(self, exchange: Exchange) -> tuple[AccessToken, RecordKind] | None:
        """For the C lane: the credentials and kind of a device-message POST, None for any other route."""
        handler, credentials = _route(exchange)
        kind = POSTS.get(handler)
        return None if kind is None or credentials is None else (credentials, kind)

    def _post_failed(self, exchange: Exchange, exc: Exception) -> None:
        """For the C lane: posting raised (what ``post`` and ``_handle`` answer)."""
        if isinstance(exc, PayloadError):  # already counted and logged
            self._answer(exchange, Code.BAD_REQUEST, str(exc).encode()[:256])
            return
        log.error("CoAP request handler failed", exc_info=exc)
        self.api.metrics.errors.labels(component="coap").inc()
        if exchange.state != ANSWERED:
            self._answer(exchange, Code.INTERNAL_SERVER_ERROR)

    def _posted(self, exchange: Exchange, device: DeviceIdentity, admitted: Outcome) -> None:
        """Answered at once: refused, or nothing to store."""
        if admitted is Outcome.RATE_LIMITED:  # RFC 8516 4.29, Max-Age = when the device may send this again
            wait = self.api.rate_limit_wait_s(device)
            if wait == math.inf:  # more data points than the limit allows at once: no wait helps (HTTP 413)
                self._answer(exchange, Code.REQUEST_ENTITY_TOO_LARGE, NEVER_PASSES.encode())
            else:
                self._answer(exchange, Code.TOO_MANY_REQUESTS, options=_max_age(wait))
        else:
            self._outcome(exchange, admitted)

    def _delivered(self, exchange: Exchange, device: DeviceIdentity, future: asyncio.Future[Outcome]) -> None:
        outcome = Outcome.SHUTTING_DOWN if future.cancelled() else future.result()
        self.api.settle(device, COAP, outcome)
        self._outcome(exchange, outcome)

    def _outcome(self, exchange: Exchange, outcome: Outcome) -> None:
        code = OUTCOME_CODES[outcome]
        if code == Code.CREATED:
            assert self._loop is not None
            self._latency.observe(self._loop.time() - exchange.received_at)
            self._answer(exchange, code)
        elif code == Code.SERVICE_UNAVAILABLE:
            self._answer(exchange, code, options=self._retry_after)
        else:
            self._answer(exchange, code)

    def get_attributes(self, exchange: Exchange, device: DeviceIdentity) -> None:
        """``?clientKeys=a,b&sharedKeys=x`` -> 2.05 ``{"client":{..},"shared":{..}}``, 4.04 when nothing found."""
        keys: dict[str, list[str] | None] = {"clientKeys": None, "sharedKeys": None}
        for item in exchange.query:
            name, _, value = item.partition("=")
            if name in keys:
                keys[name] = [key.strip() for key in value.split(",") if key.strip()]
        found = self.api.attribute_request(device, keys["clientKeys"], keys["sharedKeys"])
        if not found:
            self.refuse(exchange, device, Code.NOT_FOUND, "not_found")
        else:
            self._answer(exchange, Code.CONTENT, orjson.dumps(found), _JSON)

    def _answer(self, exchange: Exchange, code: int, payload: bytes = b"", options: Options = ()) -> None:
        assert self._loop is not None
        self._pending -= 1
        if self._pending == 0 and self._idle is not None:
            self._idle.set()
        self.endpoint.respond(exchange, self._loop.time(), code, payload, options)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Answers and notifications resolved together (one sink batch) leave in one flush."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)


def _route(exchange: Exchange) -> tuple[Any, AccessToken | None]:
    """``(handler, credentials)`` for a device route, or ``(Refusal, None)``."""
    path = exchange.path
    if len(path) < 2 or path[0] != "api" or path[1] != "v1":
        return Refusal(Code.NOT_FOUND, "not_found"), None
    if len(path) == 3 and path[2] in ROUTES:  # /api/v1/{feature}: the token is missing (spec §4: 4.01)
        return Refusal(Code.UNAUTHORIZED, None), None
    methods = ROUTES.get(path[3]) if len(path) == 4 else RPC_REPLY if len(path) == 5 and path[3] == "rpc" else None
    if methods is None:
        return Refusal(Code.BAD_REQUEST, "bad_request", b"unknown path"), None
    handler = methods.get(exchange.code)
    if handler is None:  # ThingsBoard: a GET on a POST-only feature is 4.00, other methods 4.05
        if exchange.code == Code.GET:
            return Refusal(Code.BAD_REQUEST, "bad_request"), None
        return Refusal(Code.METHOD_NOT_ALLOWED, "method_not_allowed"), None
    if not _accepts_json(exchange, path):
        return Refusal(Code.NOT_ACCEPTABLE, "not_acceptable"), None
    return handler, AccessToken(path[2])


def _accepts_json(exchange: Exchange, path: tuple[str, ...]) -> bool:
    """Answers with content (GET, client RPC) are JSON only: an Accept naming anything else is 4.06 (RFC 7252
    §5.10.4). ThingsBoard ignores Accept, but a client that asks for text/plain or CBOR cannot read JSON."""
    if exchange.code != Code.GET and (len(path) != 4 or path[3] != "rpc"):
        return True
    accept = exchange.uint_option(Option.ACCEPT)
    return accept is None or accept == ContentFormat.JSON


def _max_age(wait_s: float) -> Options:
    return ((Option.MAX_AGE, encode_uint(ceil_seconds(wait_s))),)


def _post(kind: RecordKind) -> Handler:
    def handler(server: CoapServer, exchange: Exchange, device: DeviceIdentity) -> None:
        server.post(exchange, device, kind)

    POSTS[handler] = kind
    return handler


POSTS: dict[Any, RecordKind] = {}  # the device-message handlers (``_post``) and their kinds: what the C lane takes


def _downlink(handle: Callable[[CoapDownlink, Exchange, DeviceIdentity], None]) -> Handler:
    """A downlink route; a gateway built without the downlink (unit tests) answers it 4.04."""

    def route(server: CoapServer, exchange: Exchange, device: DeviceIdentity) -> None:
        if server.downlink is None:
            server.refuse(exchange, device, Code.NOT_FOUND, "not_found")
        else:
            handle(server.downlink, exchange, device)

    return route


def _get_attributes(server: CoapServer, exchange: Exchange, device: DeviceIdentity) -> None:
    """GET attributes: Observe 0 / 1 (de)registers an observation of shared-attribute updates, else the
    attribute request."""
    if server.downlink is None or exchange.observe not in (0, 1):
        server.get_attributes(exchange, device)
    else:
        server.downlink.observe(exchange, device, Feature.ATTRIBUTES)


# feature -> method -> handler (spec §4)
ROUTES: dict[str, dict[int, Handler]] = {
    "telemetry": {Code.POST: _post(RecordKind.TELEMETRY)},
    "attributes": {Code.POST: _post(RecordKind.ATTRIBUTES), Code.GET: _get_attributes},
    "claim": {Code.POST: _post(RecordKind.CLAIM)},
    "rpc": {
        Code.GET: _downlink(lambda side, exchange, device: side.observe(exchange, device, Feature.RPC)),
        Code.POST: _downlink(CoapDownlink.client_rpc),
    },
}
RPC_REPLY: dict[int, Handler] = {Code.POST: _downlink(CoapDownlink.rpc_reply)}  # .../rpc/{id}
