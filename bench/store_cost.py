"""What the embedded store's durable write costs HTTP (README, "What the durable write costs").

The HTTP scenario at 200 connections (CPU-bound: the gateway's core is ~95% busy), against nginx and against
gateways whose store is cut short at one point (bench/store_variant.py): as it is, without the fdatasync,
and with the append skipped. Each is pinned like the gateway in bench/http_bench.py; runs alternate over all
of them, the best of ``ROUNDS`` counts. The variants answer without durability, so this is a measurement of
where the core's time goes, never a figure for the gateway. Only the difference between the first and the
last is a clean figure: a writer that answers at once makes the pipeline's batches smaller (they grow while
a sync is in flight), so per-batch costs weigh more in the variants than in the gateway.

    python -m bench --only storecost [--seconds 10]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import SERVER_CORE, pinned, process, result_row, tempdir, wait_port
from bench.http_bench import BODY, TOKEN, WARMUP_S, WRK_SCRIPT, nginx_command, wrk
from bench.store_variant import VARIANTS
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port

CONNECTIONS = 200
ROUNDS = 2
REPO = Path(__file__).resolve().parent.parent

assert len(BODY) == 60  # the same request as the HTTP scenario


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    workdir = tempdir()
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    nginx_port = free_port()
    env = {"MQTT_ENABLED": "false", "COAP_ENABLED": "false", "BATCH_SIZE": "2000", "PYTHONPATH": str(REPO)}
    gateways = {
        variant: GatewayProcess(
            workdir / variant,
            env,
            prefix=pinned(SERVER_CORE, sys.executable, "-m", "bench.store_variant", variant),
        )
        for variant in VARIANTS
    }
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
