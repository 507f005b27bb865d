"""End to end into a real Kafka broker (issue 3): device send -> gateway -> Kafka `acks=all` -> device ack.

The broker (KRaft, one node, from the test harness) runs unpinned on the same machine; the gateway is pinned to
core 0 and the load generators to core 1. Reports throughput and p50/p99 from send to ack for HTTP (wrk) and
MQTT QoS 1 (the Go generator), and MQTT latency again at half the measured maximum rate (DESIGN.md §7).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from bench.common import SERVER_CORE, median_latency, pinned, register_devices, result_row, run_load, tempdir
from bench.http_bench import WRK_SCRIPT, wrk
from tests.gateway_process import GatewayProcess
from tests.harness.kafka import KafkaBroker

TOKEN = "BENCH_KAFKA_TOKEN"


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    workdir = tempdir()
    broker = KafkaBroker(workdir / "kafka").start()
    rows: list[dict[str, Any]] = []
    try:
        for topic in ("tb.telemetry", "tb.attributes", "tb.device-events"):
            broker.create_topic(topic, partitions=3)
        env = {
            "KAFKA_ENABLED": "true",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "COAP_ENABLED": "false",
            "BATCH_SIZE": "2000",
        }
        gw = GatewayProcess(workdir / "gateway", env, prefix=pinned(SERVER_CORE))
        gw.add_device("bench-kafka", TOKEN)  # HTTP: one device (no sessions)
        register_devices(gw.data_dir, TOKEN, 50)  # MQTT: one device per connection
        gw.start()
        try:
            assert gw.proc is not None
            script = workdir / "post.lua"
            script.write_text(WRK_SCRIPT)
            url = f"{gw.base_url}/api/v1/{TOKEN}/telemetry"
            wrk(url, script, 2.0, gw.proc.pid)  # warm-up: topic metadata, producer connections
            rows.append(result_row("http -> kafka, 50 conns", wrk(url, script, seconds, gw.proc.pid)))
            mqtt = ["-mode", "mqtt", "-addr", f"127.0.0.1:{gw.mqtt_port}", "-token", TOKEN, "-devices", "50"]
            full = run_load(*mqtt, "-conns", "50", "-inflight", "100", "-duration", f"{seconds}s")
            rows.append(result_row("mqtt qos1 -> kafka, 50x100", full))
            half = median_latency(partial(run_load, *mqtt, "-conns", "50", "-inflight", "100", "-duration",
                                          f"{seconds}s", "-rate", str(max(1.0, full["rate_per_s"] / 2))))  # fmt: skip
            rows.append(result_row(f"mqtt qos1 -> kafka at {full['rate_per_s'] / 2:,.0f}/s (half max)", half))
        finally:
            gw.stop()
    finally:
        broker.stop()
    return rows
