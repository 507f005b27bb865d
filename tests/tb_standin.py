"""A stand-in for ThingsBoard's HTTP device API (spec §3), for the HTTP sink and token-check tests.

It answers as ThingsBoard does: 200 with an empty body for an accepted write, 401 with an empty body for an
unknown token (checked before the body is parsed), 500 with the parser's message for malformed JSON or a
wrong shape (§5: telemetry is an object or an array of objects, attributes an object), 413 with a JSON string
when Content-Length is over the limit, and ``{"client":..,"shared":..}`` for a GET of attributes.

For fault tests it can go down — ``go_down("refuse")`` closes the listening socket and every open
connection, ``go_down("503")`` keeps listening but answers 503 — and come back on the same port; and
``fail_next`` scripts the next answers (a 500, a 429 with Retry-After, ...). It runs ``http.server`` in a
thread so it serves a gateway subprocess and a test's own event loop alike.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TB_MAX_PAYLOAD_BYTES = 52_428_800  # HTTP_TRANSPORT_MAX_PAYLOAD_SIZE_LIMIT for /api/v1/** (spec §3)


@dataclass(frozen=True)
class Received:
    """One accepted write: which device (token), which endpoint, and the parsed JSON body."""

    token: str
    endpoint: str
    body: Any


@dataclass(frozen=True)
class Answered:
    """Every request the stand-in answered (accepted or not), in order."""

    method: str
    path: str
    status: int


@dataclass
class _Scripted:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    standin: ThingsBoardStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection reset by go_down() or by the client is expected here, not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.standin._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.standin._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.standin._handle(self, "POST")

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class ThingsBoardStandIn:
    def __init__(self, tokens: tuple[str, ...] = (), *, max_payload_bytes: int = TB_MAX_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.delay_s = 0.0  # added before every answer: a slow backend
        self.port = 0
        self.connections_accepted = 0  # TCP connections ever accepted: keep-alive keeps this low
        self._tokens = set(tokens)
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._answered: list[Answered] = []
        self._client_attributes: dict[str, dict[str, Any]] = {}
        self._shared_attributes: dict[str, dict[str, Any]] = {}
        self._script: deque[_Scripted] = deque()
        self._token_script: dict[str, deque[_Scripted]] = {}
        self._mode = "up"
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---
    def start(self) -> ThingsBoardStandIn:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.standin = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> ThingsBoardStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- faults ---
    def go_down(self, mode: str = "refuse") -> None:
        """``refuse``: no listener, open connections reset; ``503``: listening, every request answered 503."""
        if mode == "refuse":
            self.stop()
        self._mode = mode

    def come_back(self) -> None:
        self._mode = "up"
        if self._server is None:
            self.start()

    def fail_next(
        self,
        status: int,
        count: int = 1,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        token: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (of one device's ``token``, or any) with ``status`` instead."""
        with self._lock:
            script = self._script if token is None else self._token_script.setdefault(token, deque())
            script.extend(_Scripted(status, body, dict(headers or {})) for _ in range(count))

    # --- devices and what they sent ---
    def add_token(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    def remove_token(self, token: str) -> None:
        with self._lock:
            self._tokens.discard(token)

    def set_shared(self, token: str, values: dict[str, Any]) -> None:
        with self._lock:
            self._shared_attributes.setdefault(token, {}).update(values)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def answered(self) -> list[Answered]:
        with self._lock:
            return list(self._answered)

    def telemetry(self, token: str) -> list[dict[str, Any]]:
        """Every telemetry entry accepted for ``token`` (arrays flattened), in arrival order."""
        entries: list[dict[str, Any]] = []
        for item in self.received:
            if item.token == token and item.endpoint == "telemetry":
                entries.extend(item.body if isinstance(item.body, list) else [item.body])
        return entries

    def client_attributes(self, token: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._client_attributes.get(token, {}))

    # --- request handling (handler threads) ---
    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
                self.connections_accepted += 1
            else:
                self._connections.discard(connection)

    def _handle(self, handler: _Handler, method: str) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        url = urlsplit(handler.path)
        status, body, headers = self._route(handler, method, url.path, parse_qs(url.query))
        with self._lock:
            self._answered.append(Answered(method, url.path, status))
        handler.answer(status, body, headers)

    def _route(
        self, handler: _Handler, method: str, path: str, query: dict[str, list[str]]
    ) -> tuple[int, bytes, dict[str, str]]:
        length = int(handler.headers.get("Content-Length") or 0)
        if length > self.max_payload_bytes:
            handler.close_connection = True  # the body stays unread
            message = f"Payload size {length} exceeds the limit of {self.max_payload_bytes} bytes"
            return 413, json.dumps(message).encode(), {}
        raw = handler.read_body() if method == "POST" else b""
        if self._mode == "503":
            return 503, b"", {}
        parts = path.split("/")
        token = unquote(parts[3]) if len(parts) > 3 else ""
        with self._lock:
            script = self._token_script.get(token) or self._script
            scripted = script.popleft() if script else None
        if scripted is not None:
            return scripted.status, scripted.body, scripted.headers
        if len(parts) != 5 or parts[:3] != ["", "api", "v1"]:
            return 404, b"", {}
        endpoint = parts[4]
        with self._lock:
            known = token in self._tokens
        if not known:
            return 401, b"", {}
        if method == "GET" and endpoint == "attributes":
            return 200, self._attributes_answer(token, query), {}
        if method == "POST" and endpoint in _SHAPES:
            return self._write(token, endpoint, raw)
        return 404, b"", {}

    def _write(self, token: str, endpoint: str, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
        try:
            body = json.loads(raw) if raw or endpoint != "claim" else {}  # a claim's body is optional
            _SHAPES[endpoint](body)
        except ValueError as exc:
            return 500, str(exc).encode(), {}
        with self._lock:
            self._received.append(Received(token, endpoint, body))
            if endpoint == "attributes":
                self._client_attributes.setdefault(token, {}).update(body)
        return 200, b"", {}

    def _attributes_answer(self, token: str, query: dict[str, list[str]]) -> bytes:
        with self._lock:
            sections = {
                "client": dict(self._client_attributes.get(token, {})),
                "shared": dict(self._shared_attributes.get(token, {})),
            }
        for section, param in (("client", "clientKeys"), ("shared", "sharedKeys")):
            if param in query:
                wanted = set(",".join(query[param]).split(","))
                sections[section] = {k: v for k, v in sections[section].items() if k in wanted}
        return json.dumps({name: values for name, values in sections.items() if values}).encode()


def _telemetry_shape(body: Any) -> None:
    items = body if isinstance(body, list) else [body]
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"Can't parse value: {json.dumps(item)}")


def _object_shape(body: Any) -> None:
    if not isinstance(body, dict):
        raise ValueError(f"Can't parse value: {json.dumps(body)}")


_SHAPES = {"telemetry": _telemetry_shape, "attributes": _object_shape, "claim": _object_shape}
