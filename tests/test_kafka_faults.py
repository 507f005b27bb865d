"""Issue 3 fault tests at the pipeline level: Pipeline -> SpoolingSink -> KafkaSink -> a real broker.

(a) the broker stops in the middle of a stream of acknowledged messages and comes back: every acknowledged
record is in Kafka, the last copy of each in per-device order, duplicates only of records that were spooled;
(c) the spool fills while the broker is down: refusals, counted, and nothing acknowledged is lost.
(b, kill -9 of the gateway process, is in test_kafka_gateway.py; d, permanent rejection, in test_kafka_sink.py.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import Pipeline
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks import kafka_records
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.kafka import KafkaSink
from tb_gateway.sinks.reliable import SpoolingSink
from tb_gateway.sinks.spool import ENTRY_HEADER, Spool, encode_record
from tests.harness.kafka import KafkaBroker, read_topic

pytestmark = pytest.mark.kafka

DEVICES = [f"dev{i}" for i in range(5)]


def rec(device: str, seq: int) -> Record:
    return Record(
        device=DeviceIdentity(id=f"id-{device}", name=device),
        kind=RecordKind.TELEMETRY,
        ts=1_700_000_000_000 + seq,
        values={"seq": seq, "temperature": 20 + seq % 10},
        transport=Transport.MQTT,
        received_at=1_700_000_000_000 + seq,
    )


class Stack:
    """The real delivery path minus the transports."""

    def __init__(self, kafka: KafkaBroker, tmp_path: Path, *, spool_max_bytes: int = 64 << 20) -> None:
        self.topic = f"fault-{uuid.uuid4().hex[:8]}.telemetry"
        self.metrics = Metrics()
        self.primary = KafkaSink(
            bootstrap_servers=[kafka.bootstrap],
            topics=dict.fromkeys(RecordKind, self.topic),
            metrics=self.metrics,
            delivery_timeout_ms=2500,
            max_in_flight=4,
        )
        self.sink = SpoolingSink(
            self.primary, Spool(tmp_path / "spool", spool_max_bytes), self.metrics, backoff_max_s=0.5
        )
        self.pipeline = Pipeline(self.sink, self.metrics, batch_size=100, batch_timeout_s=0.005, max_queue=50_000)

    async def run(self, body: Callable[[], Awaitable[None]]) -> None:
        await self.sink.start()
        async with asyncio.TaskGroup() as tasks:
            pipeline = tasks.create_task(self.pipeline.run())
            background = tasks.create_task(self.sink.run())
            try:
                await body()
                await until(lambda: self.sink.spool.records == 0, 60)
            finally:
                self.pipeline.close()
                await pipeline
                await self.sink.close()
                background.cancel()

    def metric(self, name: str) -> float:
        for line in self.metrics.render().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


async def until(condition: Callable[[], bool], limit_s: float) -> None:
    """Poll state that other tasks change (the spool depth, a tally): no event exists for it."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def send(pipeline: Pipeline, record: Record) -> Outcome:
    result = pipeline.submit([record])
    return result if isinstance(result, Outcome) else await result


def in_kafka(kafka: KafkaBroker, topic: str) -> list[dict[str, Any]]:
    return [kafka_records.check(m["key"], m["value"], m["headers"]) for m in read_topic(kafka.bootstrap, topic)]


def check_per_device(stored: list[dict[str, Any]], acked: dict[str, list[int]]) -> Counter[str]:
    """Every acked record is there; the last copies are in device order; copies are identical. Returns dups."""
    last: dict[tuple[str, int], int] = {}
    by_id: dict[str, bytes] = {}
    copies: Counter[str] = Counter()
    for position, value in enumerate(stored):
        last[(value["device"], value["values"]["seq"])] = position
        body = orjson.dumps(value)
        assert by_id.setdefault(value["msg_id"], body) == body  # a duplicate is the very same record
        copies[value["msg_id"]] += 1
    for device, seqs in acked.items():
        present = sorted((pos, seq) for (d, seq), pos in last.items() if d == device)
        order = [seq for _, seq in present]
        assert set(seqs) <= set(order), f"{device}: acked but missing {sorted(set(seqs) - set(order))[:10]}"
        assert order == sorted(order), f"{device}: last copies out of order"
    return Counter({msg_id: n - 1 for msg_id, n in copies.items() if n > 1})


def test_a_broker_stopped_mid_stream_loses_no_acknowledged_record(kafka: KafkaBroker, tmp_path: Path) -> None:
    stack = Stack(kafka, tmp_path)
    acked: dict[str, list[int]] = {d: [] for d in DEVICES}
    outcomes: Counter[Outcome] = Counter()
    per_device = 600

    async def device(name: str) -> None:
        for seq in range(per_device):  # a device with one message in flight, like an HTTP client
            outcome = await send(stack.pipeline, rec(name, seq))
            outcomes[outcome] += 1
            if outcome is Outcome.DELIVERED:
                acked[name].append(seq)
            await asyncio.sleep(0.002)

    async def outage() -> None:
        await until(lambda: sum(map(len, acked.values())) >= 500, 60)
        await asyncio.to_thread(kafka.stop)
        await asyncio.sleep(3.0)  # longer than the delivery timeout: in-flight records fail and are spooled
        await asyncio.to_thread(kafka.start)

    async def body() -> None:
        await asyncio.gather(outage(), *(device(d) for d in DEVICES))

    asyncio.run(stack.run(body))
    assert outcomes == {Outcome.DELIVERED: per_device * len(DEVICES)}  # the spool took the outage
    spooled = stack.metric('tb_gateway_spool_appended_total{sink="kafka"}')
    assert spooled > 0, "the outage never reached the spool: the test did not test anything"
    stored = in_kafka(kafka, stack.topic)
    dups = check_per_device(stored, acked)
    print(f"outage: {spooled:.0f} records spooled, {sum(dups.values())} duplicates in Kafka")
    assert sum(dups.values()) <= spooled  # duplicates only of records that went through the spool
    assert stack.metric('tb_gateway_spool_replayed_total{sink="kafka"}') >= spooled - sum(dups.values())
    keys = {(v["device"], v["values"]["seq"]) for v in stored}
    assert len(keys) == per_device * len(DEVICES)


def test_a_full_spool_refuses_visibly_and_loses_nothing_acked(kafka: KafkaBroker, tmp_path: Path) -> None:
    stack = Stack(kafka, tmp_path, spool_max_bytes=1 << 20)
    one = len(encode_record(rec("dev0", 10))) + ENTRY_HEADER.size
    stack.sink.spool.max_bytes = 60 * one  # about 60 records: a small spool fills quickly
    acked: dict[str, list[int]] = {d: [] for d in DEVICES[:2]}
    refused: list[tuple[str, int]] = []

    async def body() -> None:
        await asyncio.to_thread(kafka.stop)
        try:
            for seq in range(60):
                for name in acked:
                    outcome = await send(stack.pipeline, rec(name, seq))
                    assert outcome in (Outcome.DELIVERED, Outcome.SPOOL_FULL)
                    if outcome is Outcome.DELIVERED:
                        acked[name].append(seq)
                    else:
                        refused.append((name, seq))
            health = stack.sink.health()
            assert health["status"] == "down"
            assert health["spool"]["records"] == sum(map(len, acked.values()))
        finally:
            await asyncio.to_thread(kafka.start)

    asyncio.run(stack.run(body))
    assert refused, "the spool never filled"
    assert 50 <= sum(map(len, acked.values())) <= 60
    assert stack.metric('tb_gateway_records_failed_total{outcome="spool_full"}') == len(refused)
    stored = in_kafka(kafka, stack.topic)
    check_per_device(stored, acked)
    keys = {(v["device"], v["values"]["seq"]) for v in stored}
    assert keys == {(d, s) for d, seqs in acked.items() for s in seqs}  # refused ones never reached Kafka
