"""DeviceApi: the transport-neutral device API (normalize -> pipeline -> attribute store, refusals counted)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tb_gateway.auth import AccessToken
from tb_gateway.device_api import DeviceApi, claim
from tb_gateway.errors import PayloadError
from tb_gateway.logs import Throttle
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tests.support import MemorySink, make_api

dev = DeviceIdentity("id-dev1", "dev1")


def refusals(api: DeviceApi, transport: str, reason: str) -> float:
    value = api.metrics.registry.get_sample_value(
        "tb_gateway_refusals_total", {"transport": transport, "reason": reason}
    )
    return value or 0.0


def within(api: DeviceApi, scenario):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        runner = asyncio.create_task(api.pipeline.run())
        try:
            return await scenario()
        finally:
            api.pipeline.close()
            await runner

    return asyncio.run(main())


def test_telemetry_becomes_one_record_per_timestamp_group(tmp_path: Path) -> None:
    sink = MemorySink()
    api = make_api(tmp_path, sink)

    async def scenario() -> None:
        device = await api.authenticate(AccessToken("T1"), Transport.HTTP)
        assert device is not None
        payload = b'[{"ts":1,"values":{"a":1}},{"ts":2,"values":{"a":2}},{"b":null}]'
        assert await api.post(device, RecordKind.TELEMETRY, payload, Transport.MQTT) is Outcome.DELIVERED  # type: ignore[misc]

    within(api, scenario)
    assert [(r.ts, r.values, r.transport) for r in sink.records] == [
        (1, {"a": 1}, Transport.MQTT),
        (2, {"a": 2}, Transport.MQTT),
    ]
    sent = api.metrics.registry.get_sample_value("tb_gateway_messages_sent_total", {"transport": "mqtt"})
    received = api.metrics.registry.get_sample_value("tb_gateway_messages_received_total", {"transport": "mqtt"})
    assert (sent, received) == (2, 1)


def test_client_attributes_readable_only_after_delivery(tmp_path: Path) -> None:
    sink = MemorySink()
    api = make_api(tmp_path, sink)

    async def scenario() -> None:
        sink.gate.clear()
        pending = api.post(dev, RecordKind.ATTRIBUTES, b'{"fw":"1.2.3","model":"TH-100"}', Transport.HTTP)
        await asyncio.sleep(0.01)
        assert api.attribute_request(dev, None, None) == {}  # not durable yet: not visible
        sink.gate.set()
        assert await pending is Outcome.DELIVERED  # type: ignore[misc]
        assert api.attribute_request(dev, ["fw"], None) == {"client": {"fw": "1.2.3"}}

    within(api, scenario)


def test_bad_payload_is_counted_logged_once_per_period_and_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = make_api(tmp_path)

    async def scenario() -> None:
        for _ in range(5):
            with pytest.raises(PayloadError, match="invalid JSON"):
                api.post(dev, RecordKind.TELEMETRY, b"{oops", Transport.COAP)
        with pytest.raises(PayloadError, match="attributes: expected a JSON object"):
            api.post(dev, RecordKind.ATTRIBUTES, b"[1]", Transport.COAP)

    with caplog.at_level(logging.WARNING):
        within(api, scenario)
    assert refusals(api, "coap", "bad_payload") == 6
    assert len([r for r in caplog.records if "bad_payload" in r.getMessage()]) == 1


def test_full_queue_refused_and_counted(tmp_path: Path) -> None:
    sink = MemorySink()
    api = make_api(tmp_path, sink, queue_max_records=1)

    async def scenario() -> None:
        sink.gate.clear()
        first = api.post(dev, RecordKind.TELEMETRY, b'{"a":1}', Transport.HTTP)
        await asyncio.sleep(0.01)
        second = api.post(dev, RecordKind.TELEMETRY, b'{"a":2}', Transport.HTTP)
        third = api.post(dev, RecordKind.TELEMETRY, b'{"a":3}', Transport.HTTP)
        assert third is Outcome.QUEUE_FULL
        sink.gate.set()
        await asyncio.gather(first, second)  # type: ignore[arg-type]

    within(api, scenario)
    assert refusals(api, "http", "queue_full") == 1


def test_claim_body_is_optional() -> None:
    assert claim(b"") == {"secretKey": "", "durationMs": 0}
    assert claim(b'{"secretKey":"s","durationMs":60000}') == {"secretKey": "s", "durationMs": 60000}
    for bad in (b"[]", b'{"durationMs":"soon"}', b'{"secretKey":1}'):
        with pytest.raises(PayloadError):
            claim(bad)


def test_session_limits_report_the_configured_limits(tmp_path: Path) -> None:
    api = make_api(tmp_path, max_payload_size=1000, mqtt_max_inflight=7)
    assert api.session_limits() == {
        "maxPayloadSize": 1000,
        "maxInflightMessages": 7,
        "rateLimits": {"messages": None, "telemetryMessages": None, "telemetryDataPoints": None},
    }


def test_throttle_logs_first_and_counts_the_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = Throttle(logging.getLogger("t"), period_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            throttle.warning("k", "event %s", "x")
        throttle.warning("other", "event %s", "y")
        now[0] = 61
        throttle.warning("k", "event %s", "x")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["event x", "event y", "event x (3 similar suppressed in the last period)"]


def test_refusals_are_logged_once_per_device_reason_and_transport(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device's HTTP refusal must not hide the same refusal of its MQTT connection from the log."""
    api = make_api(tmp_path)
    dev = DeviceIdentity("id-1", "dev1")
    with caplog.at_level(logging.WARNING):
        for transport in (Transport.HTTP, Transport.HTTP, Transport.MQTT, Transport.COAP):
            api.refused(dev, transport, "bad_payload", "detail")
    lines = [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]
    assert [line.split(" over ")[1].split(":")[0] for line in lines] == ["http", "mqtt", "coap"]
    assert refusals(api, "http", "bad_payload") == 2
