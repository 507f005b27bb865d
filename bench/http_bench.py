"""HTTP: keep-alive POST telemetry against nginx (DESIGN.md §7; target >= 0.5x nginx).

nginx-light (one worker, ``location / { return 200; }``) and the real ``tb-gateway run`` process (embedded
store sink, so every 200 follows an fdatasynced append to its log; Kafka, MQTT and CoAP off) are each pinned to core
0; wrk, pinned to core 1, keeps N connections busy with a 60-byte JSON POST and reports through a Lua
``done()`` hook. Runs alternate nginx / gateway so both see the same machine; the median of the paired
rounds' ratios counts. The gateway's own ``messages_sent_total`` must cover every 2xx wrk counted (nothing was
acknowledged early).

    python -m bench --only http [--seconds 10]        or        python -m bench.http_bench
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import LOAD_CORE, SERVER_CORE, cpu_s, pinned, process, result_row, tempdir, wait_port
from tests.gateway_process import GatewayProcess
from tests.harness.ports import free_port

TOKEN = "BENCH_HTTP_TOKEN_0001"
CONNECTIONS = (50, 200)  # the second: enough requests per fdatasync that CPU, not the disk, is the bound
ROUNDS = 3  # alternated nginx / gateway pairs per connection count; their median ratio is reported
WARMUP_S = 2.0
BODY = '{"temperature":42.5,"humidity":73,"active":true,"note":"ok"}'  # 60 bytes

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
}}
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = 'BODY'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"non_2xx":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status))
end
""".replace("BODY", BODY)


def wrk(url: str, script: Path, seconds: float, server_pid: int, connections: int = CONNECTIONS[0]) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cpu_s(server_pid)
    cmd = pinned(LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    duration_s = summary["duration_us"] / 1e6
    generator_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "rate_per_s": (summary["requests"] - summary["non_2xx"]) / duration_s,
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "generator_cpu_s": generator_cpu_s,
        "generator_cpu_share": generator_cpu_s / duration_s,
        "server_cpu_share": (cpu_s(server_pid) - server_before) / duration_s,
        **summary,
    }


def nginx_command(workdir: Path, port: int) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return pinned(SERVER_CORE, nginx, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log"))


def _sent(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith('tb_gateway_messages_sent_total{transport="http"}'):
            return float(line.split()[-1])
    return 0.0


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by rate, with every run's rate in ``rounds`` (as ``alternate`` reports them)."""
    ordered = sorted(runs, key=lambda r: float(r["rate_per_s"]))
    return {**ordered[len(ordered) // 2], "rounds": [round(r["rate_per_s"]) for r in runs]}


def throughput(seconds: float = 10.0) -> list[dict[str, Any]]:
    workdir = tempdir()
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    nginx_port = free_port()
    # BATCH_SIZE as in every other scenario (README, Performance): at 200 connections the default 100 split
    # the records waiting for one fdatasync into two or more batches, each with its own. INFO: start() waits
    # for "gateway ready"
    env = {"MQTT_ENABLED": "false", "COAP_ENABLED": "false", "BATCH_SIZE": "2000"}
    gw = GatewayProcess(workdir / "gateway", env, prefix=pinned(SERVER_CORE))
    gw.add_device("bench-http", TOKEN)
    nginx_url = f"http://127.0.0.1:{nginx_port}/api/v1/{TOKEN}/telemetry"
    gateway_url = f"{gw.base_url}/api/v1/{TOKEN}/telemetry"
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {(c, n): [] for c in CONNECTIONS for n in ("nginx", "gateway")}
    try:
        with process(nginx_command(workdir, nginx_port)) as nginx:
            wait_port(nginx_port)
            gw.start()
            assert gw.proc is not None
            targets = {"nginx": (nginx_url, nginx.pid), "gateway": (gateway_url, gw.proc.pid)}
            for url, pid in targets.values():
                wrk(url, script, WARMUP_S, pid, CONNECTIONS[0])
            for connections in CONNECTIONS:
                for _ in range(ROUNDS):
                    for name, (url, pid) in targets.items():
                        runs[connections, name].append(wrk(url, script, seconds, pid, connections))
                        time.sleep(0.5)
            confirmed = _sent(gw.metrics_port)
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    acknowledged = sum(r["requests"] - r["non_2xx"] for (_, name), rs in runs.items() if name == "gateway" for r in rs)
    if confirmed < acknowledged:
        raise AssertionError(f"gateway answered {acknowledged} x 2xx but confirmed only {confirmed:.0f} records")
    rows = []
    for connections in CONNECTIONS:  # the median round of each, and the median of the paired rounds' ratios
        ours, reference = (median_round(runs[connections, name]) for name in ("gateway", "nginx"))
        row = result_row(f"http keep-alive POST {connections} conns", ours, reference, "nginx")
        rounds = {name: runs[connections, name] for name in ("nginx", "gateway")}
        rows.append({**row, "rounds": rounds, "records_confirmed": confirmed})
    return rows


def main() -> None:
    from bench.common import ratio_cell, save, table

    results = throughput()
    rows = [("", "req/s", "p50 ms", "p99 ms", "gen CPU", "server CPU", "non-2xx")]
    for row in results:
        for name in ("nginx", "gateway"):
            r = row["reference" if name == "nginx" else "gateway"]
            rows.append(
                (
                    f"{name}, {row['scenario']}",
                    f"{r['rate_per_s']:,.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['generator_cpu_share']:.0%}",
                    f"{r['server_cpu_share']:.0%}",
                    str(r["non_2xx"]),
                )
            )
    print(table(rows))
    for row in results:
        print(f"{row['scenario']}: gateway / nginx {ratio_cell(row)} (target >= 0.5x)")
    print(f"saved {save('http', {'http': results})}")


if __name__ == "__main__":
    main()
