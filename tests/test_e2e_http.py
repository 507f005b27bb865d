"""End to end: the real `tb-gateway run` process, driven with curl and httpx, on the embedded default."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import BIN, GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "A1_TEST_TOKEN"


def curl(*args: str) -> tuple[int, str]:
    """Run curl; returns (HTTP status, body)."""
    out = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=30
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def stored(gateway: GatewayProcess, *extra: str) -> list[dict[str, Any]]:
    """Telemetry and attribute records in the embedded store (device-state events left out)."""
    lines = gateway.cli("messages", "--json", *extra).stdout.splitlines()
    return [r for r in map(orjson.loads, lines) if r["kind"] in ("telemetry", "attributes")]


@pytest.fixture
def running(gateway: GatewayProcess) -> GatewayProcess:
    gateway.add_device("thermostat-1", TOKEN)
    return gateway


def test_seed_readme_example_end_to_end(running: GatewayProcess) -> None:
    status, body = curl(
        "-X",
        "POST",
        f"{running.base_url}/api/v1/{TOKEN}/telemetry",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"temperature":25.5,"humidity":60}',
    )
    assert (status, body) == (200, "")
    [record] = stored(running)
    assert record["device"] == "thermostat-1"
    assert record["kind"] == "telemetry"
    assert record["values"] == {"temperature": 25.5, "humidity": 60}
    assert record["transport"] == "http"
    assert abs(record["received_at"] - time.time() * 1000) < 60_000
    assert record["ts"] == record["received_at"]  # no ts sent: server time
    text = running.cli("messages").stdout
    assert "thermostat-1" in text and '"temperature":25.5' in text


def test_timestamped_array_and_attributes_round_trip(running: GatewayProcess) -> None:
    with httpx.Client(base_url=running.base_url) as client:
        payload = [{"ts": 1234567890000, "values": {"t": 25.5}}, {"ts": 1234567891000, "values": {"t": 25.6}}]
        assert client.post(f"/api/v1/{TOKEN}/telemetry", json=payload).status_code == 200
        attrs = {"firmware_version": "1.2.3", "model": "TH-100", "serial_number": "SN123456"}
        assert client.post(f"/api/v1/{TOKEN}/attributes", json=attrs).status_code == 200
        response = client.get(f"/api/v1/{TOKEN}/attributes", params={"clientKeys": "model,firmware_version"})
        assert response.status_code == 200
        assert response.json() == {"client": {"model": "TH-100", "firmware_version": "1.2.3"}}
        assert client.get(f"/api/v1/{TOKEN}/attributes").json() == {"client": attrs}
        assert client.get(f"/api/v1/{TOKEN}/attributes", params={"sharedKeys": "x"}).json() == {}
    records = stored(running)
    assert [(r["kind"], r["ts"]) for r in records[:2]] == [("telemetry", 1234567890000), ("telemetry", 1234567891000)]
    assert records[2]["kind"] == "attributes" and records[2]["values"] == attrs
    assert stored(running, "--device", "nobody") == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/api/v1/WRONG/telemetry", b'{"a":1}', 401, None),
        ("POST", "/api/v1/WRONG/telemetry", b"{not json", 401, None),  # token checked before the body
        ("POST", f"/api/v1/{TOKEN}/telemetry", b"{not json", 400, "invalid JSON"),
        ("POST", f"/api/v1/{TOKEN}/telemetry", b"42", 400, "expected a JSON object or array"),
        ("POST", f"/api/v1/{TOKEN}/attributes", b"[1,2]", 400, "attributes: expected a JSON object"),
        ("POST", f"/api/v1/{TOKEN}/telemetry", b'{"k":"' + b"x" * 70000 + b'"}', 413, None),
        ("POST", f"/api/v1/{TOKEN}/nothing", b"{}", 404, None),
        ("GET", "/nowhere", b"", 404, None),
        ("GET", f"/api/v1/{TOKEN}/telemetry", b"", 405, None),
        ("DELETE", f"/api/v1/{TOKEN}/attributes", b"", 405, None),
    ],
)
def test_error_cases(
    running: GatewayProcess, method: str, path: str, body: bytes, status: int, error: str | None
) -> None:
    response = httpx.request(method, running.base_url + path, content=body)
    assert response.status_code == status
    if error is not None:
        assert error in response.json()["error"]
    assert stored(running) == []


def test_health_and_metrics(running: GatewayProcess) -> None:
    health = httpx.get(f"{running.base_url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "up"
    assert health.json()["components"]["sink"]["status"] == "up"
    with httpx.Client(base_url=running.base_url) as client:
        client.post(f"/api/v1/{TOKEN}/telemetry", json={"a": 1})
        client.post("/api/v1/WRONG/telemetry", json={"a": 1})
        client.post(f"/api/v1/{TOKEN}/telemetry", content=b"{bad")
    text = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics").text
    for name in (
        'tb_gateway_messages_received_total{transport="http"} 2.0',
        'tb_gateway_messages_sent_total{transport="http"} 1.0',
        "tb_gateway_devices_connected",
        'tb_gateway_auth_failures_total{transport="http"} 1.0',
        "tb_gateway_errors_total",
        "tb_gateway_queue_depth 0.0",
        'tb_gateway_ack_latency_seconds_count{transport="http"}',
        'tb_gateway_refusals_total{reason="bad_payload",transport="http"} 1.0',
    ):
        assert name in text, name


def test_logs_are_json_and_not_one_line_per_message(running: GatewayProcess) -> None:
    before = len(running.log().splitlines())
    with httpx.Client(base_url=running.base_url) as client:
        for n in range(50):
            assert client.post(f"/api/v1/{TOKEN}/telemetry", json={"n": n}).status_code == 200
    after = running.log().splitlines()
    assert len(after) - before < 5
    for line in after:
        entry = orjson.loads(line)
        assert {"timestamp", "level", "message"} <= set(entry)


def test_messages_follow_while_the_gateway_runs(running: GatewayProcess) -> None:
    follower = subprocess.Popen(
        [str(BIN / "tb-gateway"), "messages", "--follow", "--json"],
        env=running.env,
        cwd=running.data_dir,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        httpx.post(f"{running.base_url}/api/v1/{TOKEN}/telemetry", json={"live": 1})
        assert follower.stdout is not None
        records = (orjson.loads(line) for line in follower.stdout)
        assert next(r for r in records if r["kind"] == "telemetry")["values"] == {"live": 1}
    finally:
        follower.kill()
        follower.wait()
        if follower.stdout is not None:
            follower.stdout.close()


def _stream(gateway: GatewayProcess, client_id: int, acked: list[int], stop: threading.Event) -> None:
    with httpx.Client(base_url=gateway.base_url, timeout=5) as client:
        n = 0
        while not stop.is_set() and n < 100_000:
            value = client_id * 1_000_000 + n
            try:
                response = client.post(f"/api/v1/{TOKEN}/telemetry", json={"n": value})
            except httpx.HTTPError:
                return  # the gateway went away: whatever was not answered 200 was not promised
            if response.status_code == 200:
                acked.append(value)
            n += 1


def _run_streams(gateway: GatewayProcess, interrupt: Any, clients: int = 4) -> list[int]:
    acked: list[int] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_stream, args=(gateway, c, acked, stop)) for c in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    interrupt()
    stop.set()
    for thread in threads:
        thread.join(10)
    return acked


def test_kill_9_mid_stream_loses_nothing_that_was_acknowledged(running: GatewayProcess) -> None:
    acked = _run_streams(running, running.kill9)
    assert len(acked) >= 300
    running.start()  # restart on the same DATA_DIR
    kept = {r["values"]["n"] for r in stored(running)}
    missing = set(acked) - kept
    assert missing == set()


def test_sigterm_flushes_what_was_accepted_and_exits_cleanly(running: GatewayProcess) -> None:
    codes: list[int] = []
    acked = _run_streams(running, lambda: codes.append(running.stop()))
    assert codes == [0]
    assert "stopped" in running.log()
    kept = {r["values"]["n"] for r in stored(running)}
    assert set(acked) <= kept
    assert len(acked) >= 300


def test_two_gateways_do_not_share_anything(gateway_factory: GatewayFactory) -> None:
    a, b = gateway_factory("a").start(), gateway_factory("b").start()
    a.add_device("only-on-a", "TOKEN_A")
    assert httpx.post(f"{a.base_url}/api/v1/TOKEN_A/telemetry", json={"x": 1}).status_code == 200
    assert httpx.post(f"{b.base_url}/api/v1/TOKEN_A/telemetry", json={"x": 1}).status_code == 401


def test_the_running_gateway_applies_store_retention_from_its_settings(gateway_factory: GatewayFactory) -> None:
    """STORE_RETENTION_HOURS reaches the process: an old sealed segment goes at start-up, is counted, and
    `messages` lists what is left (docs/records.md)."""
    import os

    from tb_gateway.sinks.segments import SegmentWriter, segments

    gateway = gateway_factory("gw", store_retention_hours="1")
    log_dir = gateway.data_dir / "messages"
    old = SegmentWriter(log_dir, 1024)  # small segments, written before the gateway starts
    old.open()
    for n in range(30):
        record = {"device": "old", "device_id": "id-old", "device_type": "default", "kind": "telemetry", "ts": n}
        old.append(
            [orjson.dumps({**record, "values": {"n": n, "pad": "x" * 100}, "transport": "http", "received_at": n})]
        )
    old.close()
    listed = segments(log_dir)
    assert len(listed) >= 3
    for _, path in listed[:-1]:
        os.utime(path, (time.time() - 7200, time.time() - 7200))  # two hours old: past the limit
    gateway.start()
    gateway.add_device("thermostat-1", TOKEN)
    assert curl("-X", "POST", "-d", '{"n":99}', f"{gateway.base_url}/api/v1/{TOKEN}/telemetry")[0] == 200
    assert [first for first, _ in segments(log_dir)] == [listed[-1][0]]
    values = [r["values"]["n"] for r in stored(gateway)]
    assert values[-1] == 99 and values[0] > 0  # what the old segments held is gone, the newest is kept
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text
    assert f'tb_gateway_store_segments_removed_total{{reason="age"}} {len(listed) - 1}.0' in text
    assert "removed segment" in gateway.log()
