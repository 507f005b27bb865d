"""WORKERS=2 against WORKERS=1: MQTT QoS 1 and HTTP keep-alive throughput (docs/scale-out.md).

The gateway is not pinned here (two workers need both cores); the load generator stays pinned to core 1, so
the ideal is close to 2x minus the generator's share of that core. Same shapes as the single-process
benchmarks: MQTT 50 connections x 100 in flight (Go loadgen), HTTP 50 keep-alive connections (wrk), each
against the embedded store (every ack follows an fsynced SQLite commit; both workers share the one store).

    python -m bench --only workers [--seconds 10]        or        python -m bench.workers_bench
"""

from __future__ import annotations

import shutil
from typing import Any

from bench.common import result_row, run_load, tempdir
from bench.http_bench import TOKEN as HTTP_TOKEN
from bench.http_bench import WRK_SCRIPT, wrk
from tests.gateway_process import GatewayProcess

MQTT_TOKEN = "BENCH_WORKERS_TOKEN"


def _mqtt(workers: int, seconds: float) -> dict[str, Any]:
    env = {"HTTP_ENABLED": "false", "COAP_ENABLED": "false", "BATCH_SIZE": "2000", "WORKERS": str(workers)}
    gw = GatewayProcess(tempdir(), env)
    gw.add_device("bench-device", MQTT_TOKEN)
    gw.start()
    try:
        load = ["-mode", "mqtt", "-conns", "50", "-inflight", "100", "-duration", f"{seconds}s"]
        return run_load(*load, "-addr", f"127.0.0.1:{gw.mqtt_port}", "-token", MQTT_TOKEN)
    finally:
        gw.stop()
        shutil.rmtree(gw.data_dir, ignore_errors=True)


def _http(workers: int, seconds: float) -> dict[str, Any]:
    workdir = tempdir()
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {"MQTT_ENABLED": "false", "COAP_ENABLED": "false", "WORKERS": str(workers)}
    gw = GatewayProcess(workdir / "gateway", env)
    gw.add_device("bench-http", HTTP_TOKEN)
    gw.start()
    try:
        assert gw.proc is not None
        url = f"{gw.base_url}/api/v1/{HTTP_TOKEN}/telemetry"
        wrk(url, script, 2.0, gw.proc.pid)  # warm-up
        return wrk(url, script, seconds, gw.proc.pid)
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    rows = []
    for name, measure in (("mqtt qos1 50x100", _mqtt), ("http keep-alive 50", _http)):
        one, two = measure(1, seconds), measure(2, seconds)
        rows.append(result_row(f"{name}, WORKERS=2 vs 1", two, one, "WORKERS=1"))
    return rows


if __name__ == "__main__":
    for row in throughput():
        print(f"{row['scenario']}: {row['gateway']['rate_per_s']:,.0f}/s vs {row['reference']['rate_per_s']:,.0f}/s")
