"""The Kafka sink against a real broker: the documented record format, rejections, a broker that is absent."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from tb_gateway.config import Settings
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks import kafka_records
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.kafka import KafkaSink
from tb_gateway.sinks.reliable import SpoolingSink
from tb_gateway.sinks.spool import Spool
from tests.harness.kafka import KafkaBroker, read_topic
from tests.harness.ports import free_port

try:
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - built without a C compiler
    _speedups = None  # type: ignore[assignment]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kafka-records.md"
# the C produce loop and delivery reports (_kafka_lane.c), and the Python path they replace
PATHS = [
    pytest.param(True, id="c", marks=pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")),
    pytest.param(False, id="python"),
]


def topics(prefix: str) -> dict[RecordKind, str]:
    return {
        RecordKind.TELEMETRY: f"{prefix}.telemetry",
        RecordKind.ATTRIBUTES: f"{prefix}.attributes",
        RecordKind.CLAIM: f"{prefix}.device-events",
    }


def rec(device: str, seq: int, kind: RecordKind = RecordKind.TELEMETRY, **values: Any) -> Record:
    return Record(
        device=DeviceIdentity(id=f"dev-{device}", name=device, type="thermometer", token="secret-token"),
        kind=kind,
        ts=1_700_000_000_000 + seq,
        values={"seq": seq, **values},
        transport=Transport.MQTT,
        received_at=1_700_000_000_500 + seq,
    )


def sink_for(bootstrap: str, prefix: str, metrics: Metrics, fast: bool = True, **kw: Any) -> KafkaSink:
    kw.setdefault("delivery_timeout_ms", 5000)
    sink = KafkaSink(bootstrap_servers=[bootstrap], topics=topics(prefix), metrics=metrics, **kw)
    sink.fast = fast and _speedups is not None
    return sink


async def deliver_once(sink: KafkaSink, batch: Sequence[Record]) -> list[Outcome]:
    await sink.start()
    try:
        return list(await sink.deliver(batch))
    finally:
        await sink.close()


def test_documented_examples_follow_schema_1() -> None:
    """Every record example in docs/kafka-records.md has exactly the fields, types and headers of schema 1."""
    text = DOCS.read_text()
    examples = re.findall(r"```json\n(\{.*?\})\n```", text, flags=re.S)
    records = [orjson.loads(e) for e in examples if '"msg_id"' in e]
    assert {r["kind"] for r in records} == {k.value for k in RecordKind}
    for value in records:
        headers = [
            ("tb-schema", b"1"),
            ("tb-kind", value["kind"].encode()),
            ("tb-transport", value["transport"].encode()),
            ("tb-msg-id", value["msg_id"].encode()),
        ]
        kafka_records.check(value["device_id"].encode(), orjson.dumps(value), headers)
    defaults = Settings()
    for topic in (defaults.kafka_topic_telemetry, defaults.kafka_topic_attributes, defaults.kafka_topic_device_events):
        assert f"`{topic}`" in text


def test_check_refuses_what_schema_1_does_not_allow() -> None:
    key, value, headers = kafka_records.encode(rec("a", 1))
    assert kafka_records.check(key, value, headers)["values"] == {"seq": 1}
    data = orjson.loads(value)
    bad_cases: list[tuple[bytes, dict[str, Any], Any]] = [
        (b"other", data, headers),
        (key, {**data, "schema": 2}, headers),
        (key, {**data, "ts": "1"}, headers),
        (key, {**data, "ts": True}, headers),
        (key, {**data, "kind": "rpc"}, headers),
        (key, {**data, "msg_id": "XYZ"}, headers),
        (key, {k: v for k, v in data.items() if k != "transport"}, headers),
        (key, {**data, "extra": 1}, headers),
        (key, data, headers[:-1]),
        (key, data, [*headers[:-1], ("tb-msg-id", b"0" * 32)]),
    ]
    for k, v, h in bad_cases:
        with pytest.raises(ValueError):
            kafka_records.check(k, orjson.dumps(v), h)
    with pytest.raises(ValueError):
        kafka_records.check(key, b"[1, 2]", headers)


def test_message_id_is_the_same_for_copies_and_differs_for_different_records() -> None:
    assert kafka_records.message_id(rec("a", 1)) == kafka_records.message_id(rec("a", 1))
    assert kafka_records.message_id(rec("a", 1)) != kafka_records.message_id(rec("a", 2))
    assert kafka_records.message_id(rec("a", 1)) != kafka_records.message_id(rec("b", 1))
    assert kafka_records.message_id(rec("a", 1)) != kafka_records.message_id(rec("a", 1, RecordKind.ATTRIBUTES))


@pytest.mark.kafka
@pytest.mark.parametrize("fast", PATHS)
def test_real_records_match_the_documented_format(kafka: KafkaBroker, fast: bool) -> None:
    prefix = f"fmt-{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    batch = [
        rec("oven", 1, temperature=21.5, on=True),
        rec("fridge", 1, temperature=4),
        rec("oven", 2, RecordKind.ATTRIBUTES, firmware="1.2.3"),
        rec("oven", 3, temperature=22.0),
        Record(
            device=DeviceIdentity(id="dev-oven", name="oven", type="thermometer"),
            kind=RecordKind.CLAIM,
            ts=1_700_000_000_009,
            values={"secretKey": "abc", "durationMs": 60000},
            transport=Transport.HTTP,
            received_at=1_700_000_000_009,
        ),
    ]
    outcomes = asyncio.run(deliver_once(sink_for(kafka.bootstrap, prefix, metrics, fast), batch))
    assert outcomes == [Outcome.DELIVERED] * len(batch)

    telemetry = read_topic(kafka.bootstrap, f"{prefix}.telemetry")
    attributes = read_topic(kafka.bootstrap, f"{prefix}.attributes")
    events = read_topic(kafka.bootstrap, f"{prefix}.device-events")
    assert (len(telemetry), len(attributes), len(events)) == (3, 1, 1)
    for msg in telemetry + attributes + events:
        value = kafka_records.check(msg["key"], msg["value"], msg["headers"])
        assert value["msg_id"] == kafka_records.message_id(next(r for r in batch if r.to_dict() == _plain(value)))
    oven = [kafka_records.check(m["key"], m["value"], m["headers"]) for m in telemetry if m["key"] == b"dev-oven"]
    assert [v["values"] for v in oven] == [{"seq": 1, "temperature": 21.5, "on": True}, {"seq": 3, "temperature": 22.0}]
    assert len({m["partition"] for m in telemetry if m["key"] == b"dev-oven"}) == 1  # key = device id
    assert orjson.loads(attributes[0]["value"])["values"] == {"seq": 2, "firmware": "1.2.3"}
    claim = orjson.loads(events[0]["value"])
    assert (claim["kind"], claim["transport"], claim["values"]) == (
        "claim",
        "http",
        {"secretKey": "abc", "durationMs": 60000},
    )
    assert b"secret-token" not in b"".join(m["value"] for m in telemetry)  # tokens never leave the gateway
    text = metrics.render().decode()
    assert f'tb_gateway_kafka_records_total{{result="delivered",topic="{prefix}.telemetry"}} 3.0' in text
    assert "tb_gateway_kafka_delivery_latency_seconds_count 5.0" in text


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k not in ("schema", "msg_id")}


@pytest.mark.kafka
@pytest.mark.parametrize("fast", PATHS)
def test_a_record_too_large_for_the_topic_is_rejected_alone(kafka: KafkaBroker, fast: bool) -> None:
    """KAFKA_MESSAGE_MAX_BYTES at or below the topic's max.message.bytes: only the big record is refused."""
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(f"{prefix}.telemetry", config={"max.message.bytes": "4096"})
    metrics = Metrics()
    big = os.urandom(3000).hex()  # hex does not compress below the limit
    batch = [rec("a", 1), rec("a", 2, blob=big), rec("a", 3), rec("b", 1)] + [rec("c", i) for i in range(60)]
    sink = sink_for(kafka.bootstrap, prefix, metrics, fast, message_max_bytes=4000)
    outcomes = asyncio.run(deliver_once(sink, batch))
    assert outcomes[:4] == [Outcome.DELIVERED, Outcome.REJECTED, Outcome.DELIVERED, Outcome.DELIVERED]
    assert outcomes[4:] == [Outcome.DELIVERED] * 60  # 60 small records still share batches under the limit
    stored = [orjson.loads(m["value"]) for m in read_topic(kafka.bootstrap, f"{prefix}.telemetry")]
    assert sorted((v["device"], v["values"]["seq"]) for v in stored if v["device"] != "c") == [
        ("a", 1),
        ("a", 3),
        ("b", 1),
    ]
    assert f'tb_gateway_kafka_records_total{{result="rejected",topic="{prefix}.telemetry"}} 1.0' in (
        metrics.render().decode()
    )


@pytest.mark.kafka
@pytest.mark.parametrize("fast", PATHS)
def test_a_record_the_broker_refuses_does_not_block_the_next_ones(kafka: KafkaBroker, fast: bool) -> None:
    """The producer's limit above the topic's: the broker refuses the record; later records still flow."""
    prefix = f"brk-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(f"{prefix}.telemetry", config={"max.message.bytes": "4096"})
    metrics = Metrics()
    sink = sink_for(kafka.bootstrap, prefix, metrics, fast)

    async def body() -> list[list[Outcome]]:
        await sink.start()
        try:
            first = list(await sink.deliver([rec("a", 1, blob=os.urandom(4000).hex())]))
            second = list(await sink.deliver([rec("a", 2), rec("b", 1)]))
            return [first, second]
        finally:
            await sink.close()

    assert asyncio.run(body()) == [[Outcome.REJECTED], [Outcome.DELIVERED, Outcome.DELIVERED]]
    assert len(read_topic(kafka.bootstrap, f"{prefix}.telemetry")) == 2


def test_no_broker_at_start_up_logs_once_and_spools(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    primary = KafkaSink(
        bootstrap_servers=[f"127.0.0.1:{free_port()}"],
        topics=topics("none"),
        metrics=metrics,
        delivery_timeout_ms=2000,
        startup_probe_s=0.5,
    )
    sink = SpoolingSink(primary, Spool(tmp_path / "spool", 10_000_000), metrics)

    async def body() -> None:
        await sink.start()
        runner = asyncio.create_task(sink.run())
        try:
            assert primary.health()["status"] == "down"
            for i in range(3):
                assert list(await sink.deliver([rec("a", i)])) == [Outcome.DELIVERED]
            await asyncio.sleep(1.0)  # reconnect attempts and replay probes happen meanwhile
            health = sink.health()
            assert health["status"] == "degraded"
            assert health["spool"]["records"] == 3
        finally:
            await sink.close()
            runner.cancel()

    with caplog.at_level(logging.INFO, logger="tb_gateway"):
        asyncio.run(body())
    unreachable = [r for r in caplog.records if "Kafka unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
    assert 'tb_gateway_spool_records{sink="kafka"} 3.0' in metrics.render().decode()


@pytest.mark.parametrize("fast", PATHS)
def test_a_full_producer_queue_fails_only_what_did_not_fit(fast: bool) -> None:
    """produce() raising BufferError settles that record at once (the spool keeps it); the rest go on."""
    metrics = Metrics()
    sink = sink_for(
        f"127.0.0.1:{free_port()}",
        "full",
        metrics,
        fast,
        startup_probe_s=0.1,
        delivery_timeout_ms=1000,
        extra_config={"queue.buffering.max.messages": 2},
    )
    sink._timeout_s = 0.5  # no broker: the two queued records get no report within it

    async def body() -> tuple[list[Outcome], int]:
        await sink.start()
        try:
            outcomes = list(await sink.deliver([rec("a", i) for i in range(5)]))
            assert len(sink._producer) == 2  # queued; the other three were refused by produce() itself
            return outcomes, sink.health()["batches_in_flight"]
        finally:
            sink._producer.purge()
            await sink.close()

    outcomes, in_flight = asyncio.run(body())
    assert outcomes == [Outcome.SINK_FAILED] * 5
    assert in_flight == 0
    assert 'tb_gateway_kafka_records_total{result="failed",topic="full.telemetry"} 5.0' in metrics.render().decode()
