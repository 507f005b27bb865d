"""The admin API: a small JSON-over-HTTP endpoint on 127.0.0.1 only, used by the CLI.

``tb-gateway rpc`` and ``tb-gateway attributes`` talk to the running gateway through it, which is how RPC
and shared attributes reach devices on the embedded default, with no Kafka. ``ADMIN_PORT=0`` (default)
binds a free port; the port is written to ``DATA_DIR/admin.json`` so the CLI finds it.

==========================  ====================================================  =========================
request                     body                                                  answer
==========================  ====================================================  =========================
POST /api/rpc               ``{"device","method","params","oneway","timeout_ms"}``  final outcome (below)
POST /api/attributes        ``{"device","update":{..},"delete":[..]}``            ``{"pushed": {..}|null}``
GET /api/devices/{name}     -                                                     state and shared attributes
==========================  ====================================================  =========================

An RPC is answered once it is finished: 200 ``{"id","status","response"}`` when replied (or, one-way,
delivered), 504 when expired or timed out, 503 when rejected or cancelled. 404 for an unknown device, 400
for a malformed body. One request per connection; bodies are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson

from tb_gateway.config import Settings
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.rpc import RpcStatus
from tb_gateway.downlink.shared_attributes import parse_change
from tb_gateway.errors import PayloadError
from tb_gateway.registry import Registry

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never anything else: the admin API has no authentication
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
READ_TIMEOUT_S = 10.0
ADMIN_FILE = "admin.json"

Answer = tuple[int, dict[str, Any]]
_STATUS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_RPC_HTTP_STATUS = {
    RpcStatus.REPLIED: 200,
    RpcStatus.DELIVERED: 200,
    RpcStatus.EXPIRED: 504,
    RpcStatus.TIMEOUT: 504,
    RpcStatus.REJECTED: 503,
    RpcStatus.CANCELLED: 503,
}


class AdminServer:
    name = "admin"

    def __init__(
        self, downlink: Downlink, registry: Registry, data_dir: Path, port: int = 0, file_name: str = ADMIN_FILE
    ) -> None:
        self._downlink = downlink
        self._registry = registry
        self._file = data_dir / file_name
        self._port = port
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self.shared_listeners: list[Callable[[str, dict[str, Any]], object]] = []  # e.g. to other instances
        self._routes: dict[tuple[str, str], Callable[[Any], Awaitable[Answer]]] = {
            ("POST", "/api/rpc"): self._rpc,
            ("POST", "/api/attributes"): self._attributes,
        }

    @classmethod
    def from_settings(cls, settings: Settings, downlink: Downlink, registry: Registry) -> AdminServer:
        """With WORKERS=N each worker has its own admin API (ADMIN_PORT + index, admin-<index>.json) and the
        CLI asks each which one holds the device (docs/downlink.md, "More than one process")."""
        index = settings.worker_index or 0
        port = settings.admin_port + index if settings.admin_port else 0
        name = ADMIN_FILE if index == 0 else f"admin-{index}.json"
        return cls(downlink, registry, settings.data_dir, port, name)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self._port, limit=MAX_HEAD_BYTES)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._file.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"host": HOST, "port": self.port, "pid": os.getpid()}))
        tmp.replace(self._file)
        log.info("admin API on %s:%d", HOST, self.port)

    async def run(self) -> None:
        await self._stopped.wait()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self._file.unlink()
        self._stopped.set()

    # --- HTTP, minimal: one request per connection ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                method, path, body = await _read_request(reader)
            status, answer = await self._dispatch(method, path, body)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            status, answer = 400, {"error": f"bad request: {exc}"}
        except ConnectionError:
            return
        data = orjson.dumps(answer)
        head = (
            f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + data)
            await writer.drain()
        writer.close()

    async def _dispatch(self, method: str, path: str, body: bytes) -> Answer:
        if method == "GET" and path.startswith("/api/devices/"):
            return self._device(unquote(path.removeprefix("/api/devices/")))
        handler = self._routes.get((method, path))
        if handler is None:
            return 404, {"error": f"no such endpoint: {method} {path}"}
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return 400, {"error": f"body is not JSON: {exc}"}
        if not isinstance(document, dict):
            return 400, {"error": "body must be a JSON object"}
        try:
            return await handler(document)
        except PayloadError as exc:
            return 400, {"error": str(exc)}

    # --- endpoints ---

    async def _rpc(self, body: dict[str, Any]) -> Answer:
        device = self._registry.by_name(str(body.get("device", "")))
        if device is None:
            return 404, {"error": f"no device named {body.get('device')!r}"}
        method, oneway, timeout_ms = body.get("method"), body.get("oneway", False), body.get("timeout_ms")
        if not isinstance(method, str) or not method:
            raise PayloadError("'method' must be a non-empty string")
        if not isinstance(oneway, bool):
            raise PayloadError("'oneway' must be true or false")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0
        ):
            raise PayloadError("'timeout_ms' must be a positive integer")
        _request, outcome = self._downlink.send_rpc(
            device.id, method, body.get("params"), oneway=oneway, timeout_ms=timeout_ms, device=device.identity
        )
        result = await outcome
        return _RPC_HTTP_STATUS[result.status], {
            "id": result.request.id,  # the holder's id when another process delivered it (downlink/router.py)
            "status": result.status.value,
            "response": result.response,
        }

    async def _attributes(self, body: dict[str, Any]) -> Answer:
        name = str(body.pop("device", ""))
        device = self._registry.by_name(name)
        if device is None:
            return 404, {"error": f"no device named {name!r}"}
        pushed = self._downlink.change_shared(device.id, parse_change(body))
        for listener in self.shared_listeners:
            listener(device.id, body)
        return 200, {"pushed": pushed}

    def _device(self, name: str) -> Answer:
        device = self._registry.by_name(name)
        if device is None:
            return 404, {"error": f"no device named {name!r}"}
        return 200, {
            "name": device.name,
            "id": device.id,
            "state": self._downlink.device_state(device.id),
            "shared": self._downlink.shared.snapshot(device.id),
            "sessions": [s.transport.value for s in self._downlink.sessions.sessions(device.id)],
        }


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ValueError(f"body of {length} bytes (at most {MAX_BODY_BYTES})")
    body = await reader.readexactly(length) if length else b""
    return method, path.split("?", 1)[0], body


def admin_ports(data_dir: Path, configured: int, workers: int = 1) -> list[int]:
    """Where the running gateway's admin APIs listen, worker 0 first: ADMIN_PORT (+ index), else what each
    worker wrote to DATA_DIR."""
    if configured:
        return [configured + index for index in range(workers)]
    ports = []
    for index in range(workers):
        name = ADMIN_FILE if index == 0 else f"admin-{index}.json"
        try:
            ports.append(int(orjson.loads((data_dir / name).read_bytes())["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ports
