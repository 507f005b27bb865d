"""What the embedded store's durable write costs (README, "What the durable write costs").

The HTTP scenario at 200 connections (CPU-bound: the gateway's core is ~95% busy), against nginx and against
gateways whose store is cut short at one point (bench/store_variant.py): as it is, without the fdatasync,
and with the append skipped; runs alternate over all of them, the best of ``ROUNDS`` counts. Then CoAP
(50 x 20) and MQTT 500 x 1 against libcoap and mosquitto, as it is and with the append skipped (the median
of alternated rounds, as in their own scenarios). Everything is pinned as in the scenarios it repeats. The
variants answer without durability, so this is a measurement of where the core's time goes, never a figure
for the gateway. Only "as it is" against "append skipped" is a clean figure: a writer that answers at once
makes the pipeline's batches smaller (they grow while a sync is in flight), so per-batch costs weigh more in
the variants than in the gateway.

    python -m bench --only storecost [--seconds 10]
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import coap_bench, mqtt_bench
from bench.common import (
    SERVER_CORE,
    alternate,
    pinned,
    process,
    register_devices,
    result_row,
    run_load,
    tempdir,
    wait_port,
)
from bench.http_bench import BODY, TOKEN, WARMUP_S, WRK_SCRIPT, nginx_command, wrk
from bench.store_variant import VARIANTS
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port

CONNECTIONS = 200
ROUNDS = 2
REPO = Path(__file__).resolve().parent.parent

assert len(BODY) == 60  # the same request as the HTTP scenario


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    return [*http(seconds), *coap(seconds), *mqtt(seconds)]


def _variant(variant: str, env: dict[str, str], data_dir: Path | None = None) -> GatewayProcess:
    """A gateway whose store is cut short as ``variant`` says, pinned like the real one."""
    prefix = pinned(SERVER_CORE, sys.executable, "-m", "bench.store_variant", variant)
    return GatewayProcess(data_dir or tempdir(), {**env, "PYTHONPATH": str(REPO)}, prefix=prefix)


def _against(
    reference: str, command: list[str], port: int, load: list[str], token: str, conns: int, label: str
) -> list[dict[str, Any]]:
    """``reference`` (listening on ``port``) against the gateway as it is and with the append skipped."""
    env = {"HTTP_ENABLED": "false", "BATCH_SIZE": "2000"}
    env |= {"MQTT_ENABLED": "false"} if "coap" in load else {"COAP_ENABLED": "false"}
    gateways = {variant: _variant(variant, env) for variant in ("as-is", "no-append")}
    for gw in gateways.values():
        register_devices(gw.data_dir, token, conns)
    with process(command):
        time.sleep(0.5)
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            reference: partial(run_load, *load, "-addr", f"127.0.0.1:{port}", "-token", token)
        }
        try:
            for variant, gw in gateways.items():
                gw.start()
                gw_port = gw.coap_port if "coap" in load else gw.mqtt_port
                runs[variant] = partial(
                    run_load, *load, "-addr", f"127.0.0.1:{gw_port}", "-token", token, "-devices", str(conns)
                )
            medians = alternate(runs)
        finally:
            for gw in gateways.values():
                gw.stop()
    return [
        result_row(f"{label}, store {variant}", medians[variant], medians[reference], reference) for variant in gateways
    ]


def coap(seconds: float) -> list[dict[str, Any]]:
    sockets, inflight = coap_bench.SOCKETS, coap_bench.INFLIGHT
    load = ["-mode", "coap", "-conns", str(sockets), "-inflight", str(inflight), "-duration", f"{seconds}s"]
    port = free_port(socket.SOCK_DGRAM)
    command = coap_bench.libcoap_command(port)
    return _against("libcoap", command, port, load, coap_bench.TOKEN, sockets, f"coap {sockets}x{inflight}")


def mqtt(seconds: float, conns: int = 500) -> list[dict[str, Any]]:
    load = ["-mode", "mqtt", "-conns", str(conns), "-inflight", "1", "-duration", f"{seconds}s"]
    port = free_port()
    command = mqtt_bench.mosquitto_command(port)
    return _against("mosquitto", command, port, load, mqtt_bench.TOKEN, conns, f"mqtt qos1 {conns}x1")


def http(seconds: float) -> list[dict[str, Any]]:
    workdir = tempdir()
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    nginx_port = free_port()
    env = {"MQTT_ENABLED": "false", "COAP_ENABLED": "false", "BATCH_SIZE": "2000"}
    gateways = {variant: _variant(variant, env, workdir / variant) for variant in VARIANTS}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ("nginx", *VARIANTS)}
    try:
        with process(nginx_command(workdir, nginx_port)) as nginx:
            wait_port(nginx_port)
            targets = {"nginx": (f"http://127.0.0.1:{nginx_port}/api/v1/{TOKEN}/telemetry", nginx.pid)}
            for variant, gw in gateways.items():
                gw.add_device("bench-http", TOKEN)
                gw.start()
                assert gw.proc is not None
                targets[variant] = (f"{gw.base_url}/api/v1/{TOKEN}/telemetry", gw.proc.pid)
            for url, pid in targets.values():
                wrk(url, script, WARMUP_S, pid, CONNECTIONS)
            for _ in range(ROUNDS):
                for name, (url, pid) in targets.items():
                    runs[name].append(wrk(url, script, seconds, pid, CONNECTIONS))
                    time.sleep(0.5)
    finally:
        for gw in gateways.values():
            gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    best = {name: max(rs, key=lambda r: r["rate_per_s"]) for name, rs in runs.items()}
    return [
        {
            **result_row(f"http {CONNECTIONS} conns, store {variant}", best[variant], best["nginx"], "nginx"),
            "rounds": {"nginx": runs["nginx"], variant: runs[variant]},
        }
        for variant in VARIANTS
    ]
