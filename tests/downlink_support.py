"""Fakes for the downlink tests: a scripted DownlinkSession, a record-collecting pipeline, a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_gateway.attributes import AttributeStore
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.sessions import Delivery, RpcCall
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

DEVICE = DeviceIdentity("dev-1", "boiler-17", "boiler", "TOKEN")
OTHER = DeviceIdentity("dev-2", "pump-3", "pump", "TOKEN2")
T0 = 1_767_225_600_000


@dataclass(eq=False)
class FakeSession:
    device: DeviceIdentity = DEVICE
    transport: Transport = Transport.MQTT
    connection: bool = True
    answer: Delivery = Delivery.SENT
    rpcs: list[RpcCall] = field(default_factory=list)
    attributes: list[dict[str, Any]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def push_rpc(self, call: RpcCall) -> Delivery:
        if self.answer is not Delivery.REFUSED:
            self.rpcs.append(call)
        return self.answer

    def push_attributes(self, update: dict[str, Any]) -> None:
        self.attributes.append(update)

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class FakePipeline:
    """Takes records like ``Pipeline.submit``: answers a fixed outcome, or a future the test settles."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.answer: Outcome | None = Outcome.DELIVERED  # None -> a pending future
        self.futures: list[asyncio.Future[Outcome]] = []

    def submit(self, records: Sequence[Record]) -> Outcome | asyncio.Future[Outcome]:
        self.records.extend(records)
        if self.answer is not None:
            return self.answer
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def of(self, kind: RecordKind) -> list[dict[str, Any]]:
        return [r.values for r in self.records if r.kind is kind]


def make_hub(tmp_path: Path, clock: Clock, pipeline: FakePipeline, **limits: int) -> tuple[Downlink, AttributeStore]:
    store = AttributeStore(tmp_path / "attributes.db")
    hub = Downlink(
        store,
        Metrics(),
        submit=pipeline.submit,
        session_limits=lambda: {"maxPayloadSize": 65536},
        instance="w0",
        clock_ms=clock,
        **limits,
    )
    return hub, store
