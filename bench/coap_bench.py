"""CoAP: CON POST telemetry with a piggybacked 2.01 after the sink confirmed, against libcoap's server."""

from __future__ import annotations

import socket
import time
from typing import Any

from bench.common import (
    SERVER_CORE,
    alternate,
    pinned,
    process,
    register_devices,
    result_row,
    run_load,
    tempdir,
)
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port

TOKEN = "BENCH_TOKEN"
SOCKETS, INFLIGHT = 50, 20


def libcoap_command(port: int) -> list[str]:
    """libcoap's server pinned to the server core; -d lets POSTs create resources, so it answers 2.01."""
    return pinned(SERVER_CORE, "coap-server-notls", "-A", "127.0.0.1", "-p", str(port), "-d", "1000")


def throughput(seconds: float) -> list[dict[str, Any]]:
    load = ["-mode", "coap", "-conns", str(SOCKETS), "-inflight", str(INFLIGHT), "-duration", f"{seconds}s"]
    port = free_port(socket.SOCK_DGRAM)
    env = {"HTTP_ENABLED": "false", "MQTT_ENABLED": "false", "BATCH_SIZE": "2000"}
    gw = GatewayProcess(tempdir(), env, prefix=pinned(SERVER_CORE))
    register_devices(gw.data_dir, TOKEN, SOCKETS)
    with process(libcoap_command(port)):
        time.sleep(0.5)
        gw.start()
        try:
            medians = alternate(
                {
                    "libcoap": lambda: run_load(*load, "-addr", f"127.0.0.1:{port}", "-token", TOKEN),
                    "gateway": lambda: run_load(
                        *load, "-addr", f"127.0.0.1:{gw.coap_port}", "-token", TOKEN, "-devices", str(SOCKETS)
                    ),
                }
            )
        finally:
            gw.stop()
    reference, ours = medians["libcoap"], medians["gateway"]
    return [result_row(f"coap con post {SOCKETS}x{INFLIGHT}", ours, reference, "libcoap coap-server-notls")]
