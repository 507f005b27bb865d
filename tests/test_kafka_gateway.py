"""End to end through the real `tb-gateway run` process with KAFKA_ENABLED=true: HTTP in, Kafka out.

Also issue 3 point 5 (b): kill -9 of the gateway mid-stream, restarted: every acknowledged message reaches
Kafka; and the start-up without a broker (logs once, spools), and the spool-full answer (503 + Retry-After).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tb_gateway.sinks import kafka_records
from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess
from tests.harness.kafka import KafkaBroker, read_topic
from tests.harness.ports import free_port

pytestmark = pytest.mark.slow


def dead_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"


def kafka_env(bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "kafka_enabled": "true",
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic_telemetry": f"{prefix}.telemetry",
        "kafka_topic_attributes": f"{prefix}.attributes",
        "kafka_topic_device_events": f"{prefix}.device-events",
        "kafka_delivery_timeout_ms": "2000",
        **extra,
    }


def health(gateway: GatewayProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{gateway.base_url}/health", timeout=5).json())


def wait_drained(gateway: GatewayProcess, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sink = health(gateway)["components"]["sink"]
        if sink["spool"]["records"] == 0 and sink["primary"]["status"] == "up":
            return sink
        time.sleep(0.1)
    raise AssertionError(f"spool not drained: {health(gateway)}")


@pytest.mark.kafka
def test_http_messages_reach_kafka_in_the_documented_format(
    kafka: KafkaBroker, gateway_factory: GatewayFactory
) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    gateway = gateway_factory("gw", **kafka_env(kafka.bootstrap, prefix))
    gateway.add_device("boiler-17", "BOILER_TOKEN", "--type", "boiler")
    gateway.start()
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        telemetry = [{"ts": 1767225600000, "values": {"t": 71.5}}, {"ts": 1767225601000, "values": {"t": 71.6}}]
        assert client.post("/api/v1/BOILER_TOKEN/telemetry", json=telemetry).status_code == 200
        assert client.post("/api/v1/BOILER_TOKEN/attributes", json={"fw": "2.4.1"}).status_code == 200
        claim = {"secretKey": "s3cr3t", "durationMs": 60000}
        assert client.post("/api/v1/BOILER_TOKEN/claim", json=claim).status_code == 200
    sink = wait_drained(gateway)
    assert sink["spool"]["records"] == 0 and sink["primary"]["bootstrap_servers"] == kafka.bootstrap

    got = {kind: read_topic(kafka.bootstrap, f"{prefix}.{kind}") for kind in ("telemetry", "attributes")}
    events = read_topic(kafka.bootstrap, f"{prefix}.device-events")  # claims, and device state (docs/downlink.md)
    got["claim"] = [m for m in events if dict(m["headers"])["tb-kind"] == b"claim"]
    values = {k: [kafka_records.check(m["key"], m["value"], m["headers"]) for m in v] for k, v in got.items()}
    assert [(v["ts"], v["values"]) for v in values["telemetry"]] == [
        (1767225600000, {"t": 71.5}),
        (1767225601000, {"t": 71.6}),
    ]
    assert [v["values"] for v in values["attributes"]] == [{"fw": "2.4.1"}]
    assert [v["values"] for v in values["claim"]] == [claim]
    for v in values["telemetry"] + values["attributes"] + values["claim"]:
        assert (v["device"], v["device_type"], v["transport"]) == ("boiler-17", "boiler", "http")
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
    assert f'tb_gateway_kafka_records_total{{result="delivered",topic="{prefix}.telemetry"}} 2.0' in metrics
    assert 'tb_gateway_spool_records{sink="kafka"} 0.0' in metrics


class Poster(threading.Thread):
    """Posts telemetry for two devices, alternating, one request at a time; stops at the first failure."""

    def __init__(self, gateway: GatewayProcess, start: int, count: int) -> None:
        super().__init__(daemon=True)
        self.url = gateway.base_url
        self.seqs = range(start, start + count)
        self.acked: dict[str, list[int]] = {"A": [], "B": []}

    @property
    def total(self) -> int:
        return sum(map(len, self.acked.values()))

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for seq in self.seqs:
                for device in ("A", "B"):
                    try:
                        response = client.post(f"/api/v1/TOKEN_{device}/telemetry", json={"seq": seq})
                    except httpx.HTTPError:
                        return
                    if response.status_code != 200:
                        return
                    self.acked[device].append(seq)


def stream_until_killed(gateway: GatewayProcess, start: int, kill_after: int) -> dict[str, list[int]]:
    poster = Poster(gateway, start, 100_000)
    poster.start()
    deadline = time.monotonic() + 30
    while poster.total < kill_after and poster.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    gateway.kill9()  # mid-stream: the poster has a request in flight
    poster.join(15)
    assert poster.total >= kill_after, "the stream stopped before the kill"
    return poster.acked


@pytest.mark.kafka
def test_kill9_mid_stream_loses_no_acknowledged_message(kafka: KafkaBroker, gateway_factory: GatewayFactory) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    gateway = gateway_factory("gw", **kafka_env(dead_bootstrap(), prefix))
    gateway.add_device("A", "TOKEN_A")
    gateway.add_device("B", "TOKEN_B")

    gateway.start()  # no broker at all: starts anyway, says so once, spools
    first = stream_until_killed(gateway, 0, 300)
    unreachable = [line for line in gateway.log().splitlines() if "Kafka unreachable" in line]
    assert len(unreachable) == 1, unreachable

    gateway.overrides["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap
    gateway.start()  # replays the spool of the killed process, then streams straight to Kafka
    second = stream_until_killed(gateway, 100_000, 300)

    gateway.start()
    wait_drained(gateway)
    stored = [orjson.loads(m["value"]) for m in read_topic(kafka.bootstrap, f"{prefix}.telemetry")]
    for device in ("A", "B"):
        acked = first[device] + second[device]
        last: dict[int, int] = {}
        for position, value in enumerate(stored):
            if value["device"] == device:
                last[value["values"]["seq"]] = position
        missing = sorted(set(acked) - set(last))
        assert not missing, f"{device}: {len(missing)} acknowledged messages missing, e.g. {missing[:5]}"
        in_order = [seq for seq, _ in sorted(last.items(), key=lambda item: item[1])]
        assert in_order == sorted(in_order), f"{device}: out of order"


def test_spool_full_answers_503_with_retry_after(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(
        "gw", **kafka_env(dead_bootstrap(), "full", spool_max_bytes="1048576", retry_after_seconds="7")
    )
    gateway.add_device("A", "TOKEN_A")
    gateway.start()
    big = {"blob": "x" * 30_000}  # ~30 KB a record: the 1 MiB spool holds about 34
    statuses = []
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        for _ in range(60):
            response = client.post("/api/v1/TOKEN_A/telemetry", json=big)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "7"
    accepted = statuses.count(200)
    assert 25 <= accepted <= 36 and statuses == [200] * accepted + [503] * (60 - accepted)
    sink = health(gateway)["components"]["sink"]
    spooled = accepted + 1  # and the device's "activity" state record (docs/downlink.md)
    assert sink["spool"]["records"] == spooled and sink["spool"]["refusing"] is True
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
    assert f'tb_gateway_records_failed_total{{outcome="spool_full"}} {60 - accepted}.0' in metrics
