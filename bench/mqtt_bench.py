"""MQTT: QoS 1 throughput and latency against mosquitto, and resident memory per idle connection.

Scenarios (DESIGN.md §7): 50 connections x 100 in flight and 500 connections x 1 in flight, 60-byte JSON,
PUBACK only after the sink confirmed (the embedded store: an fdatasynced log); 10,000 idle connections.
"""

from __future__ import annotations

import subprocess
import time
from functools import partial
from typing import Any

from bench.common import (
    LOAD_CORE,
    SERVER_CORE,
    alternate,
    loadgen,
    median_latency,
    pinned,
    process,
    register_devices,
    result_row,
    rss_kib,
    run_load,
    tempdir,
    wait_port,
    with_server_cpu,
)
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port

TOKEN = "BENCH_TOKEN"
SHAPES = [(50, 100), (500, 1)]  # (connections, in flight per connection)
OPEN_LOOP_RATE = 20_000  # msg/s offered one PUBLISH per write: the latency a fleet of unpipelined devices sees
DEVICES = 10_000  # one device per connection, up to the idle test's count


def mosquitto_command(port: int) -> list[str]:
    """mosquitto on 127.0.0.1:``port``, pinned to the server core: no limits on in-flight or queued messages."""
    conf = tempdir() / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n"
        "max_queued_messages 0\npersistence false\nlog_dest none\nmax_connections -1\n"
    )
    return pinned(SERVER_CORE, "mosquitto", "-c", str(conf))


def gateway(**overrides: str) -> GatewayProcess:
    env = {"HTTP_ENABLED": "false", "COAP_ENABLED": "false", "BATCH_SIZE": "2000"}
    env.update(overrides)
    gw = GatewayProcess(tempdir(), env, prefix=pinned(SERVER_CORE))
    register_devices(gw.data_dir, TOKEN, DEVICES)
    return gw


def throughput(seconds: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for conns, inflight in SHAPES:
        load = ["-mode", "mqtt", "-conns", str(conns), "-inflight", str(inflight), "-duration", f"{seconds}s"]
        port = free_port()
        gw = gateway()
        with process(mosquitto_command(port)):
            wait_port(port)
            gw.start()
            try:
                target = ["-addr", f"127.0.0.1:{gw.mqtt_port}", "-token", TOKEN, "-devices", str(conns)]
                medians = alternate(
                    {
                        "mosquitto": partial(run_load, *load, "-addr", f"127.0.0.1:{port}"),
                        "gateway": partial(run_load, *load, *target),
                    }
                )
                reference, ours = medians["mosquitto"], medians["gateway"]
                if inflight > 1:  # DESIGN.md §7: latency from send to PUBACK at half the maximum, and at 20k/s
                    # with the gateway's CPU over each run: how close to saturation the latency was taken
                    assert gw.proc is not None
                    pid = gw.proc.pid
                    paced = [
                        partial(run_load, *load, *target, "-rate", str(rate))
                        for rate in (max(1.0, ours["rate_per_s"] / 2), OPEN_LOOP_RATE)
                    ]
                    half, fixed = (median_latency(partial(with_server_cpu, pid, run)) for run in paced)
            finally:
                gw.stop()
        rows.append(result_row(f"mqtt qos1 {conns}x{inflight}", ours, reference, "mosquitto"))
        if inflight > 1:
            scenario = f"mqtt qos1 {conns}x{inflight} at half max ({half['rate_per_s']:,.0f}/s): latency"
            rows.append(result_row(scenario, half))
            rows.append(result_row(f"mqtt qos1 {conns} conns open loop at {OPEN_LOOP_RATE:,}/s: latency", fixed))
    return rows


def idle_memory(connections: int = 10_000, hold_s: float = 20.0) -> dict[str, Any]:
    gw = gateway(MQTT_MAX_CONNECTIONS=str(connections + 100))
    gw.start()
    try:
        assert gw.proc is not None
        time.sleep(1.0)
        before = rss_kib(gw.proc.pid)
        holder = subprocess.Popen(
            pinned(
                LOAD_CORE,
                str(loadgen()),
                "-addr",
                f"127.0.0.1:{gw.mqtt_port}",
                "-token",
                TOKEN,
                "-idle",
                str(connections),
                "-devices",
                str(connections),
                "-hold",
                f"{hold_s}s",
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        opened = holder.stdout.readline()
        time.sleep(2.0)
        after = rss_kib(gw.proc.pid)
        holder.wait(hold_s + 30)
    finally:
        gw.stop()
    return {
        "scenario": f"mqtt idle x{connections}",
        "opened": opened.strip(),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / connections,
    }
