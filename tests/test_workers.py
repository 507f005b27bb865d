"""WORKERS=2 with the real `tb-gateway run`: both workers serve the shared ports (SO_REUSEPORT: MQTT, HTTP,
CoAP), one scrape of the supervisor's METRICS_PORT sees all of them, a worker that dies is started again
loudly, SIGTERM stops all."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

from tb_gateway.metrics import Metrics
from tb_gateway.mqtt.packets import Disconnect, PubAck, Publish
from tb_gateway.workers import MergedWorkers
from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess
from tests.mqtt_support import Client

pytestmark = pytest.mark.slow

TOKEN = "WORKERS_TOKEN"


def ready_workers(gw: GatewayProcess) -> list[dict[str, Any]]:
    for line in gw.log().splitlines():
        if line.startswith("{") and '"gateway ready"' in line:
            return list(orjson.loads(line)["workers"])
    raise AssertionError(gw.log())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sample(text: str, line_start: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(found)


def coap_post(gw: GatewayProcess) -> str:
    uri = f"coap://127.0.0.1:{gw.coap_port}/api/v1/{TOKEN}/telemetry"
    out = subprocess.run(
        ["coap-client-notls", "-B", "10", "-m", "post", "-e", '{"t":1}', uri],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout + out.stderr


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def http_post(gw: GatewayProcess) -> int:
    with httpx.Client() as fresh:  # a new connection each time: the kernel picks a worker per connection
        return fresh.post(f"{gw.base_url}/api/v1/{TOKEN}/telemetry", json={"t": 1}).status_code


async def mqtt_posts(port: int, n: int) -> list[int]:
    codes = []
    for i in range(n):
        client = await Client.connected(port, 5, TOKEN)
        await client.send(Publish("v1/devices/me/telemetry", b'{"t":1}', qos=1, packet_id=i + 1))
        ack = await client.recv()
        assert isinstance(ack, PubAck)
        codes.append(ack.reason_code)
        await client.send(Disconnect())
        await client.close()
    return codes


def test_two_workers_serve_shared_ports_and_metrics_are_merged(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(workers="2").start()
    workers = ready_workers(gw)
    assert [w["worker"] for w in workers] == [0, 1] and all(alive(w["pid"]) for w in workers)
    assert gw.log().count('"worker ready"') == 2
    gw.add_device("dev-w", TOKEN)
    time.sleep(1.2)  # the workers' registry poll
    answers = [coap_post(gw) for _ in range(24)]
    assert all("4." not in a and "5." not in a for a in answers), answers
    assert [http_post(gw) for _ in range(24)] == [200] * 24
    assert asyncio.run(mqtt_posts(gw.mqtt_port, 24)) == [0] * 24
    scrapes = [scrape(w["metrics_port"]) for w in workers]
    merged = scrape(gw.metrics_port)
    for transport in ("coap", "http", "mqtt"):
        name = f'tb_gateway_messages_received_total{{transport="{transport}"}}'
        per_worker = [sample(text, name) for text in scrapes]
        assert all(n > 0 for n in per_worker), (transport, per_worker)  # the kernel spread them over both
        assert sum(per_worker) == 24 == sample(merged, name)
    sent = [sample(text, 'tb_gateway_messages_sent_total{transport="mqtt"}') for text in scrapes]
    assert sample(merged, 'tb_gateway_messages_sent_total{transport="mqtt"}') == sum(sent) >= 24  # + state events
    assert sample(merged, 'tb_gateway_ack_latency_seconds_count{transport="http"}') == 24
    assert sample(merged, "tb_gateway_workers ") == 2
    assert merged.count("# TYPE tb_gateway_messages_received_total counter") == 1  # one family, not two
    telemetry = [line for line in gw.cli("messages", "--json").stdout.splitlines() if '"telemetry"' in line]
    assert len(telemetry) == 72  # both workers write the one embedded store
    assert gw.stop() == 0
    assert not any(alive(w["pid"]) for w in workers)
    assert '"stopped"' in gw.log()


def test_a_dead_worker_is_started_again_loudly(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(workers="2", mqtt_enabled="false", http_enabled="false").start()
    gw.add_device("dev-w", TOKEN)
    victim = ready_workers(gw)[1]
    os.kill(victim["pid"], 9)
    deadline = time.monotonic() + 20
    while gw.log().count('"worker ready"') < 3:
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.1)
    assert re.search(r"worker 1 \(pid \d+\) exited with code -9; starting it again", gw.log())
    assert sample(scrape(gw.metrics_port), 'tb_gateway_worker_restarts_total{worker="1"}') == 1
    assert sample(scrape(gw.metrics_port), "tb_gateway_workers ") == 2
    answers = [coap_post(gw) for _ in range(6)]
    assert not any("4." in a or "5." in a for a in answers), answers  # served throughout
    assert gw.stop() == 0


def test_a_worker_that_cannot_bind_stops_start_up(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(workers="2", mqtt_enabled="false", http_enabled="false")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", gw.coap_port))
        with pytest.raises(RuntimeError, match="exited with 1"):
            gw.start()
    assert "before it was ready" in gw.log()


def test_merge_rules_for_counters_histograms_and_gauges() -> None:
    workers = [Metrics(), Metrics()]
    for i, m in enumerate(workers):
        m.messages_received.labels(transport="mqtt").inc(10 * (i + 1))
        m.devices_connected.labels(transport="mqtt").set(5 + i)
        m.spool_oldest_age.labels(sink="kafka").set(3.0 * (i + 1))
        m.redis_up.set(i)  # worker 0 lost Redis
        m.ack_latency.labels(transport="mqtt").observe(0.001 * (i + 1))
    servers = [start_http_server(0, addr="127.0.0.1", registry=m.registry)[0] for m in workers]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: a worker that is gone
    try:
        ports = [int(server.server_port) for server in servers] + [int(dead.getsockname()[1])]
        registry = CollectorRegistry()
        failures = Counter("scrape_failures", "-", registry=registry)
        registry.register(MergedWorkers(lambda: [(i, 100 + i, port) for i, port in enumerate(ports)], failures))
        text = generate_latest(registry).decode()
        again = generate_latest(registry).decode()  # the failure counter is collected before the merge
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        dead.close()
    assert sample(text, 'tb_gateway_messages_received_total{transport="mqtt"}') == 30
    assert sample(text, 'tb_gateway_devices_connected{transport="mqtt"}') == 11
    assert sample(text, 'tb_gateway_spool_oldest_age_seconds{sink="kafka"}') == 6.0  # the oldest, not a sum
    assert sample(text, "tb_gateway_redis_up ") == 0  # up only if every worker is
    assert sample(text, 'tb_gateway_ack_latency_seconds_count{transport="mqtt"}') == 2
    assert sample(text, 'tb_gateway_ack_latency_seconds_bucket{le="0.001",transport="mqtt"}') == 1
    assert sample(text, 'tb_gateway_ack_latency_seconds_sum{transport="mqtt"}') == pytest.approx(0.003)
    assert sample(again, "scrape_failures_total") == 1


def test_merged_counters_never_go_down_when_a_worker_restarts_or_cannot_be_scraped() -> None:
    """A restarted worker counts from zero again; its earlier process's counts carry on in the sums (a dip
    reads as a counter reset in Prometheus, and rate() shows a false spike). Gauges are not carried."""
    old, new, other = Metrics(), Metrics(), Metrics()
    old.messages_received.labels(transport="mqtt").inc(200)
    old.ack_latency.labels(transport="mqtt").observe(0.001)
    old.devices_connected.labels(transport="mqtt").set(7)
    other.messages_received.labels(transport="mqtt").inc(200)
    servers = {
        name: start_http_server(0, addr="127.0.0.1", registry=m.registry)[0]
        for name, m in (("old", old), ("new", new), ("other", other))
    }
    port = {name: int(server.server_port) for name, server in servers.items()}
    endpoints = [(0, 10, port["old"]), (1, 11, port["other"])]
    registry = CollectorRegistry()
    registry.register(MergedWorkers(lambda: endpoints, Counter("failures", "-", registry=registry)))
    received = 'tb_gateway_messages_received_total{transport="mqtt"}'
    try:
        assert sample(generate_latest(registry).decode(), received) == 400
        endpoints[0] = (0, 20, None)  # worker 0 died and its new process is not up yet
        assert sample(generate_latest(registry).decode(), received) == 400
        endpoints[0] = (0, 20, port["new"])  # the new process, counting from zero
        new.messages_received.labels(transport="mqtt").inc(3)
        text = generate_latest(registry).decode()
        assert sample(text, received) == 403
        assert sample(text, 'tb_gateway_ack_latency_seconds_count{transport="mqtt"}') == 1
        assert sample(text, 'tb_gateway_devices_connected{transport="mqtt"}') == 0  # a gauge: not carried
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))  # bound, never listening
        endpoints[1] = (1, 11, int(dead.getsockname()[1]))  # worker 1 unreachable: it counts as last scraped
        assert sample(generate_latest(registry).decode(), received) == 403
        dead.close()
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


def test_workers_never_outlive_a_killed_supervisor(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(workers="2", mqtt_enabled="false", http_enabled="false").start()
    workers = ready_workers(gw)
    gw.kill9()  # no chance to stop them: their lifeline pipe closes with the supervisor
    deadline = time.monotonic() + 20
    while any(alive(w["pid"]) for w in workers):
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.1)
    assert gw.log().count("the supervisor is gone: stopping this worker") == 2
