"""In-process HTTP server for tests: a DeviceApi over a MemorySink, the server on a free port, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from tb_gateway.device_api import DeviceApi
from tb_gateway.downlink.hub import Downlink
from tb_gateway.http.server import HttpServer
from tests.support import MemorySink, make_api

STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main)


@dataclass
class Running:
    server: HttpServer
    api: DeviceApi
    sink: MemorySink
    url: str

    @property
    def port(self) -> int:
        return self.server.port

    def metric(self, name: str, **labels: str) -> float:
        return self.api.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    sink: MemorySink | None = None,
    health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
    tokens: dict[str, str] | None = None,
    downlink: bool = False,
    **settings: Any,
) -> AsyncIterator[Running]:
    """``downlink``: with the downlink hub (long polls, RPC replies, client RPC), closed before the drain as
    the app does."""
    sink = sink or MemorySink()
    settings.setdefault("batch_timeout", 0.01)
    api = make_api(tmp_path, sink, tokens, http_bind_address="127.0.0.1", http_bind_port=0, **settings)
    hub = None
    if downlink:
        hub = Downlink.from_settings(api.settings, api.attributes, api.metrics, api.pipeline.submit, api.session_limits)
        api.downlink = hub
    server = HttpServer(api, health or (lambda: (True, {"status": "up"})))
    pipeline = asyncio.create_task(api.pipeline.run())
    hub_task = asyncio.create_task(hub.run()) if hub is not None else None
    await server.start()
    try:
        yield Running(server, api, sink, f"http://127.0.0.1:{server.port}")
    finally:
        sink.gate.set()
        server.stop_accepting()
        if hub is not None and hub_task is not None:
            hub.close()
            await asyncio.wait_for(hub_task, 5)
        await asyncio.wait_for(server.drain(), 5)
        api.pipeline.close()
        await asyncio.wait_for(pipeline, 5)
        api.attributes.close()


class Raw:
    """One raw TCP connection: write exact bytes, read answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, within_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """Read exactly one response (Content-Length framed)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within_s)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), within_s) if length else b""
        return status, headers, body

    async def until_closed(self, within_s: float = 5.0) -> bytes:
        """Everything the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(-1), within_s)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def request(method: str, path: str, body: bytes = b"", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in STATUS.findall(data)]
