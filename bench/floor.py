"""The architecture's floor against the C references: how far can a Python + uvloop server go at all?

``bench/floor_servers.py`` holds servers that answer at once and do nothing else (no auth, no pipeline, no
store). Each runs pinned to the server core like the gateway, alternating with its reference in the same
run, under the same load as the gateway's own rows. A target the floor itself misses cannot be met by
tuning the gateway's Python: it needs native per-connection code (README, Performance).

    python -m bench --only floor        or        python -m bench.floor
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from bench.coap_bench import INFLIGHT, SOCKETS, libcoap_command
from bench.common import (
    SERVER_CORE,
    alternate,
    median_latency,
    pinned,
    process,
    result_row,
    run_load,
    save,
    table,
    tempdir,
    wait_port,
    with_server_cpu,
)
from bench.http_bench import WRK_SCRIPT, nginx_command, wrk
from bench.mqtt_bench import mosquitto_command
from tests.harness.ports import free_port

OPEN_LOOP_RATE = 70_000  # about half the gateway's pipelined MQTT maximum: its half-max latency row's load


@contextmanager
def floor_server(kind: str, port: int) -> Iterator[int]:
    """A floor server on ``port``; yields its pid."""
    with process(pinned(SERVER_CORE, sys.executable, "-m", "bench.floor_servers", kind, str(port))) as proc:
        if kind != "coap":
            wait_port(port)
        else:
            wait_udp(port)
        yield proc.pid


def wait_udp(port: int) -> None:
    """Until something answers a CON on ``port`` (a CoAP ping is an empty CON: any reply means bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        for _ in range(100):
            s.sendto(b"\x40\x00\x00\x01", ("127.0.0.1", port))
            try:
                s.recv(64)
                return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers CoAP on {port}")


def mqtt(seconds: float) -> list[dict[str, Any]]:
    rows = []
    reference_port, port = free_port(), free_port()
    with process(mosquitto_command(reference_port)), floor_server("mqtt", port) as pid:
        wait_port(reference_port)
        # the shape whose target the gateway misses; with 100 in flight it already beats mosquitto
        load = ["-mode", "mqtt", "-conns", "500", "-inflight", "1", "-duration", f"{seconds}s"]
        medians = alternate(
            {
                "mosquitto": partial(run_load, *load, "-addr", f"127.0.0.1:{reference_port}"),
                "floor": partial(with_server_cpu, pid, partial(run_load, *load, "-addr", f"127.0.0.1:{port}")),
            }
        )
        rows.append(
            result_row(
                "python floor: mqtt qos1 500x1, puback at once", medians["floor"], medians["mosquitto"], "mosquitto"
            )
        )
        paced = ["-mode", "mqtt", "-conns", "50", "-inflight", "100", "-duration", f"{seconds}s"]
        run = partial(run_load, *paced, "-addr", f"127.0.0.1:{port}", "-rate", str(OPEN_LOOP_RATE))
        latency = median_latency(partial(with_server_cpu, pid, run))
        rows.append(result_row(f"python floor: mqtt open loop at {OPEN_LOOP_RATE:,}/s: latency", latency))
    return rows


def http(seconds: float) -> dict[str, Any]:
    workdir = tempdir()
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    reference_port, port = free_port(), free_port()
    with process(nginx_command(workdir, reference_port)) as nginx, floor_server("http", port) as pid:
        wait_port(reference_port)
        path = "/api/v1/FLOOR/telemetry"
        medians = alternate(
            {
                "nginx": partial(wrk, f"http://127.0.0.1:{reference_port}{path}", script, seconds, nginx.pid),
                "floor": partial(wrk, f"http://127.0.0.1:{port}{path}", script, seconds, pid),
            }
        )
    return result_row("python floor: http keep-alive POST, 200 at once", medians["floor"], medians["nginx"], "nginx")


def coap(seconds: float) -> dict[str, Any]:
    reference_port, port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    load = ["-mode", "coap", "-conns", str(SOCKETS), "-inflight", str(INFLIGHT), "-duration", f"{seconds}s"]
    with process(libcoap_command(reference_port)), floor_server("coap", port) as pid:
        wait_udp(reference_port)
        medians = alternate(
            {
                "libcoap": partial(run_load, *load, "-addr", f"127.0.0.1:{reference_port}", "-token", "FLOOR"),
                "floor": partial(
                    with_server_cpu, pid, partial(run_load, *load, "-addr", f"127.0.0.1:{port}", "-token", "FLOOR")
                ),
            }
        )
    scenario = f"python floor: coap con post {SOCKETS}x{INFLIGHT}, 2.01 at once"
    return result_row(scenario, medians["floor"], medians["libcoap"], "libcoap")


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    return [*mqtt(seconds), http(seconds), coap(seconds)]


def main() -> None:
    rows = throughput()
    lines = [("scenario", "floor/s", "reference/s", "ratio", "p50 ms", "p99 ms", "server CPU", "µs/msg")]
    for row in rows:
        ours, ref = row["gateway"], row["reference"]
        lines.append(
            (
                row["scenario"],
                f"{ours['rate_per_s']:,.0f}",
                f"{ref['rate_per_s']:,.0f}" if ref else "-",
                f"{row['ratio']:.2f}x" if ref else "-",
                f"{ours.get('p50_ms', 0):.2f}",
                f"{ours.get('p99_ms', 0):.2f}",
                f"{ours.get('server_cpu_share', 0):.0%}",
                f"{ours.get('server_us_per_msg', 0):.1f}",
            )
        )
    print(table(lines))
    print(f"saved {save('floor', {'floor': rows})}")


if __name__ == "__main__":
    main()
