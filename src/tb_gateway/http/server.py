"""The HTTP device API server (docs/device-api.md): listening socket, connection set, timeouts, shutdown.

Why not a framework: aiohttp and uvicorn+starlette serve 30-38k req/s on one core here, raw asyncio +
httptools over 140k (DESIGN.md §3), and the device API is five routes. ``connection.py`` holds the
per-connection protocol, ``handlers.py`` what each endpoint answers, ``routes.py`` the path table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from tb_gateway.auth import AccessToken
from tb_gateway.device_api import DeviceApi
from tb_gateway.http.connection import MAX_HEAD_BYTES, HttpConnection
from tb_gateway.http.handlers import HTTP, Handler, Handlers
from tb_gateway.http.routes import Endpoint, Match, Miss, resolve
from tb_gateway.http.wire import EmptyResponses, Persist
from tb_gateway.pipeline import Ticket, when_settled
from tb_gateway.records import RecordKind
from tb_gateway.sinks.base import Outcome

try:  # what the fast lane of every connection shares (_lanes.c)
    from tb_gateway._speedups import HttpLane
except ImportError:  # pragma: no cover - built without a C compiler: no fast lane
    HttpLane = None  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, dict[str, Any]]]
# the route, its credentials, its handler, whether it takes a body, and the kind of a device message
Route = tuple[Match | Miss, AccessToken | None, Handler | None, bool, RecordKind | None]
MESSAGES = {
    Endpoint.TELEMETRY: RecordKind.TELEMETRY,
    Endpoint.ATTRIBUTES: RecordKind.ATTRIBUTES,
    Endpoint.CLAIM: RecordKind.CLAIM,
}

ROUTE_CACHE = 10_000  # distinct (method, target) pairs remembered; a flood of made-up paths just refills it


class HttpServer:
    name = "http"
    # slots: the fast lane reads draining, max_payload and idle_timeout at every request (_lanes.c)
    __slots__ = (
        "_routes",
        "_server",
        "_sweeper",
        "_tasks",
        "api",
        "body_timeout",
        "connected",
        "connections",
        "draining",
        "handlers",
        "header_timeout",
        "host",
        "idle_timeout",
        "lane",
        "max_connections",
        "max_payload",
        "port",
        "responses",
    )

    def __init__(self, api: DeviceApi, health: Health) -> None:
        settings = api.settings
        self.api = api
        self.handlers = Handlers(api, health)
        self.host = settings.http_bind_address
        self.port = settings.http_bind_port
        self.max_payload = settings.max_payload_size
        self.header_timeout = settings.http_header_timeout_seconds
        self.body_timeout = settings.http_body_timeout_seconds
        self.idle_timeout = settings.http_idle_timeout_seconds
        self.max_connections = settings.http_max_connections
        self.responses = EmptyResponses(time.time())
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.connected = api.metrics.connections.labels(transport=HTTP.value)
        self._routes: dict[tuple[bytes, bytes], Route] = {}
        self.lane = (
            None
            if HttpLane is None
            else HttpLane(
                self,
                api,
                HTTP,
                Persist.KEEP,
                Outcome,
                Outcome.DELIVERED,
                Ticket,
                when_settled,
                self.responses,
                self.handlers.ack_latency,
                MAX_HEAD_BYTES,
                ROUTE_CACHE,
            )
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            self.host,
            self.port,
            backlog=1024,
            reuse_address=True,
            reuse_port=self.api.settings.workers > 1,  # WORKERS: every worker binds the port (docs/scale-out.md)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep(), name="http-timeouts")
        log.info("HTTP device API listening on %s:%d", self.host, self.port)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self) -> None:
        """Answer what was admitted on every connection, then close them (the app bounds this in time)."""
        self.draining = True
        for connection in list(self.connections):
            connection.begin_drain()
        closing = [connection.closed for connection in self.connections]
        if closing or self._tasks:
            await asyncio.gather(*closing, *self._tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
        log.info("HTTP device API stopped")

    def route(self, method: bytes, target: bytes) -> Route:
        """``routes.resolve`` behind a cache; the credentials and the handler are looked up once per target."""
        key = (method, target)
        found = self._routes.get(key)
        if found is None:
            route = resolve(method, target)
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            if isinstance(route, Match):
                credentials = AccessToken(route.token) if route.token is not None else None
                handler = self.handlers.table[route.endpoint]
                found = (route, credentials, handler, route.endpoint.takes_body, MESSAGES.get(route.endpoint))
            else:
                found = (route, None, None, False, None)
            self._routes[key] = found
        return found

    def track(self, task: asyncio.Task[Any]) -> None:
        """Own a connection's background task (a token lookup) until it ends; ``drain`` waits for them."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """One timer for every connection: deadlines are checked a few times per shortest timeout."""
        loop = asyncio.get_running_loop()
        period = min(max(min(self.header_timeout, self.body_timeout, self.idle_timeout) / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(period)
            self.responses.refresh(time.time())
            now = loop.time()
            for connection in list(self.connections):
                if connection.deadline and now >= connection.deadline:
                    connection.expire()
