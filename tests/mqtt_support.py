"""MQTT test helpers: an in-process gateway around ``MqttServer`` and a raw client speaking our codec."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tb_gateway.attributes import AttributeStore
from tb_gateway.auth import AuthService
from tb_gateway.config import Settings
from tb_gateway.device_api import DeviceApi
from tb_gateway.metrics import Metrics
from tb_gateway.mqtt.codec import Decoder, encode
from tb_gateway.mqtt.packets import ConnAck, Connect, Packet
from tb_gateway.mqtt.server import MqttServer
from tb_gateway.pipeline import Pipeline
from tb_gateway.registry import Registry, RegistryCredentials
from tests.support import MemorySink


@dataclass
class Env:
    api: DeviceApi
    server: MqttServer
    sink: MemorySink
    registry: Registry

    @property
    def port(self) -> int:
        return self.server.ports[0]

    def sample(self, name: str, **labels: str) -> float:
        return self.api.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def mqtt_gateway(
    tmp_path: Path, sink: MemorySink | None = None, tls: ssl.SSLContext | None = None, **overrides: Any
) -> AsyncIterator[Env]:
    """Registry (dev1/T1, dev2/T2, basic1 = c1/u1/p1), pipeline over a MemorySink, DeviceApi, MqttServer on port 0."""
    config = Settings(  # type: ignore[call-arg]
        _env_file=None,
        kafka_enabled=False,
        data_dir=tmp_path,
        mqtt_bind_address="127.0.0.1",
        mqtt_bind_port=0,
        mqtt_ssl_bind_port=0,
        batch_timeout=0.01,
        **overrides,
    )
    metrics = Metrics()
    sink = sink or MemorySink()
    pipeline = Pipeline(
        sink,
        metrics,
        batch_size=config.batch_size,
        batch_timeout_s=config.batch_timeout,
        max_queue=config.queue_max_records,
    )
    registry = Registry(tmp_path / "registry.db")
    registry.add("dev1", token="T1")
    registry.add("dev2", token="T2")
    registry.add("basic1", client_id="c1", username="u1", password="p1")
    auth = AuthService([RegistryCredentials(registry)], metrics, ttl_s=60.0, negative_ttl_s=0.01)
    attributes = AttributeStore(tmp_path / "attributes.db")
    api = DeviceApi(config, auth, pipeline, attributes, metrics)
    server = MqttServer(api, tls)
    runner = asyncio.create_task(pipeline.run())
    await server.start()
    try:
        yield Env(api, server, sink, registry)
    finally:
        server.stop_accepting()
        sink.gate.set()
        async with asyncio.timeout(10):
            await server.drain()
        pipeline.close()
        await runner
        attributes.close()
        registry.close()


class Client:
    """A raw MQTT client: sends our codec's bytes, reads packets back with a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int) -> None:
        self.reader = reader
        self.writer = writer
        self.version = version
        self.decoder = Decoder(version=version)
        self.inbox: list[Packet] = []

    @classmethod
    async def open(cls, port: int, version: int = 4, tls: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(reader, writer, version)

    @classmethod
    async def connected(cls, port: int, version: int = 4, username: str = "T1", **connect: Any) -> Client:
        client = await cls.open(port, version)
        ack = await client.connect(username=username, **connect)
        assert ack.reason_code == 0, ack
        return client

    async def connect(self, username: str | None = "T1", client_id: str = "", **fields: Any) -> ConnAck:
        await self.send(Connect(client_id, self.version, username=username, **fields))
        ack = await self.recv()
        assert isinstance(ack, ConnAck), ack
        return ack

    async def send(self, *packets: Packet) -> None:
        self.writer.write(b"".join(encode(p, self.version) for p in packets))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, wait_s: float = 5.0) -> Packet:
        async with asyncio.timeout(wait_s):
            while not self.inbox:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                self.inbox += self.decoder.feed(data)
        return self.inbox.pop(0)

    async def recv_n(self, n: int, wait_s: float = 5.0) -> list[Packet]:
        return [await self.recv(wait_s) for _ in range(n)]

    async def silent(self, wait_s: float = 0.3) -> bool:
        """True if nothing arrives (and the connection stays open) for ``wait_s``."""
        if self.inbox:
            return False
        try:
            async with asyncio.timeout(wait_s):
                data = await self.reader.read(65536)
        except TimeoutError:
            return True
        self.inbox += self.decoder.feed(data)
        return False

    async def until_closed(self, wait_s: float = 5.0) -> list[Packet]:
        """Everything the server still sends, until it closes; fails if it does not close in time."""
        async with asyncio.timeout(wait_s):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                self.inbox += self.decoder.feed(data)
        packets, self.inbox = self.inbox, []
        self.writer.close()
        return packets

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
