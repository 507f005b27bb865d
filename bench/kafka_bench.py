"""End to end into a real Kafka broker (issue 3): device send -> gateway -> Kafka `acks=all` -> device ack.

The broker (KRaft, one node, from the test harness) runs unpinned on the same machine; the gateway is pinned to
core 0 and the load generators to core 1. Reports throughput and p50/p99 from send to ack for HTTP (wrk) and
MQTT QoS 1 (the Go generator), and MQTT latency again at half the measured maximum rate (DESIGN.md §7), with
the broker's own share of it: the gateway's histogram of produce -> acknowledgement over those runs.
"""

from __future__ import annotations

import re
import urllib.request
from functools import partial
from typing import Any

from bench.common import SERVER_CORE, median_latency, pinned, register_devices, result_row, run_load, tempdir
from bench.http_bench import WRK_SCRIPT, wrk
from tests.gateway_process import GatewayProcess
from tests.harness.kafka import KafkaBroker

TOKEN = "BENCH_KAFKA_TOKEN"
BUCKET = re.compile(r'^tb_gateway_kafka_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def delivery_buckets(metrics_port: int) -> dict[float, float]:
    """The gateway's cumulative produce -> acknowledgement histogram: upper bound (s) -> records at or below."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {float(le): float(count) for le, count in BUCKET.findall(text)}


def quantile_ms(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile (ms) of what was observed between two snapshots, interpolated within its bucket as
    Prometheus' histogram_quantile does; the highest finite bound when it falls in the +Inf bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000
            width = cumulative - below
            return (lower + (bound - lower) * ((rank - below) / width if width else 1.0)) * 1000
        lower, below = bound, cumulative
    return lower * 1000


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
            before = delivery_buckets(gw.metrics_port)
            half = median_latency(partial(run_load, *mqtt, "-conns", "50", "-inflight", "100", "-duration",
                                          f"{seconds}s", "-rate", str(max(1.0, full["rate_per_s"] / 2))))  # fmt: skip
            after = delivery_buckets(gw.metrics_port)
            rows.append(result_row(f"mqtt qos1 -> kafka at {full['rate_per_s'] / 2:,.0f}/s (half max)", half))
            acked = {
                "rate_per_s": half["rate_per_s"],
                "p50_ms": quantile_ms(before, after, 0.5),
                "p99_ms": quantile_ms(before, after, 0.99),
                "records": after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0),
            }
            rows.append(result_row("  of which produce -> kafka ack (gateway histogram, all rounds)", acked))
        finally:
            gw.stop()
    finally:
        broker.stop()
    return rows
