"""The admin API and the `rpc` / `attributes` CLI commands against the real `tb-gateway run` process.

Transport-independent parts: RPCs that wait and expire (and their outcome records in the embedded store),
shared attributes read back over the HTTP device API, device state records, every refusal of the CLI.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow


def messages(gateway: GatewayProcess, kind: str) -> list[dict[str, Any]]:
    out = gateway.cli("messages", "--json", "--kind", kind).stdout.splitlines()
    return [orjson.loads(line) for line in out]


def wait_for(gateway: GatewayProcess, kind: str, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = messages(gateway, kind)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {kind} records: {messages(gateway, kind)}")


def admin_port(gateway: GatewayProcess) -> int:
    return int(orjson.loads((gateway.data_dir / "admin.json").read_bytes())["port"])


def test_rpc_to_a_device_that_never_connects_expires(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    gateway.add_device("boiler-17", "TOKEN")
    gateway.start()
    started = time.monotonic()
    result = gateway.cli("rpc", "boiler-17", "setGpio", '{"pin": 4}', "--timeout", "0.5", check=False)
    assert result.returncode == 1 and "expired" in result.stderr and result.stdout == ""
    assert 0.4 < time.monotonic() - started < 8
    oneway = gateway.cli("rpc", "boiler-17", "reboot", "--oneway", "--timeout", "0.3", check=False)
    assert oneway.returncode == 1 and "expired" in oneway.stderr
    [first, second] = wait_for(gateway, "rpc_response", 2)
    assert first["values"] == {
        "id": 1,
        "requestId": None,
        "method": "setGpio",
        "oneway": False,
        "status": "expired",
        "response": None,
    }
    assert (first["device"], first["transport"]) == ("boiler-17", "gateway")
    # per-device ids; the first ended and the device holds no session, so nothing can reply to id 1 any more:
    # the gateway forgot the device (it kept every device ever sent an RPC) and ids start again
    assert second["values"]["id"] == 1 and second["values"]["oneway"] is True
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
    assert 'tb_gateway_rpc_total{status="expired"} 2.0' in metrics


def test_cli_refusals(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    gateway.add_device("boiler-17", "TOKEN")
    stopped = gateway.cli("rpc", "boiler-17", "m", check=False)
    assert stopped.returncode == 1 and "not running" in stopped.stderr
    gateway.start()
    cases = {
        ("rpc", "nobody", "m"): "no device named 'nobody'",
        ("rpc", "boiler-17", "m", "{not json"): "PARAMS_JSON is not JSON",
        ("rpc", "boiler-17", "m", "--timeout", "0"): "--timeout must be positive",
        ("attributes", "set", "boiler-17", "novalue"): "expected key=value",
        ("attributes", "set", "nobody", "a=1"): "no device named 'nobody'",
    }
    for args, expected in cases.items():
        result = gateway.cli(*args, check=False)
        assert result.returncode == 1 and expected in result.stderr, (args, result.stderr)
    assert gateway.cli("attributes", "delete", "boiler-17", "absent").stdout.strip() == "no change"


def test_admin_api_is_localhost_only_and_refuses_bad_requests(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    gateway.add_device("boiler-17", "TOKEN")
    gateway.start()
    port = admin_port(gateway)
    with socket.socket() as probe:  # bound to 127.0.0.1, so another local address does not answer
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.2", port)) != 0
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
        assert client.post("/api/rpc", content=b"{").status_code == 400
        assert client.post("/api/rpc", json=[1]).status_code == 400
        assert client.post("/api/rpc", json={"device": "boiler-17"}).status_code == 400
        assert client.post("/api/rpc", json={"device": "boiler-17", "method": "m", "oneway": "yes"}).status_code == 400
        assert client.post("/api/rpc", json={"device": "boiler-17", "method": "m", "timeout_ms": -1}).status_code == 400
        assert client.post("/api/attributes", json={"device": "boiler-17", "update": [1]}).status_code == 400
        assert client.post("/api/nothing", json={}).status_code == 404
        assert client.get("/api/devices/nobody").status_code == 404
        expired = client.post("/api/rpc", json={"device": "boiler-17", "method": "m", "timeout_ms": 50})
        assert expired.status_code == 504 and expired.json() == {"id": 1, "status": "expired", "response": None}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # a body over the cap: refused unread
        raw.sendall(b"POST /api/attributes HTTP/1.1\r\nContent-Length: 100000000\r\n\r\nx")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert gateway.stop() == 0
    assert not (gateway.data_dir / "admin.json").exists()  # a clean stop removes it


def test_shared_attributes_from_the_cli_are_answered_over_http(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    gateway.add_device("boiler-17", "TOKEN")
    gateway.start()
    pushed = gateway.cli("attributes", "set", "boiler-17", "target=21.5", "mode=eco", 'schedule={"mon":[6,22]}')
    assert orjson.loads(pushed.stdout) == {"target": 21.5, "mode": "eco", "schedule": {"mon": [6, 22]}}
    deleted = gateway.cli("attributes", "delete", "boiler-17", "mode", "absent")
    assert orjson.loads(deleted.stdout) == {"deleted": ["mode"]}
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        assert client.post("/api/v1/TOKEN/attributes", json={"fw": "v1"}).status_code == 200
        answer = client.get("/api/v1/TOKEN/attributes").json()
    assert answer == {"client": {"fw": "v1"}, "shared": {"target": 21.5, "schedule": {"mon": [6, 22]}}}
    gateway.stop()
    gateway.start()  # kept in DATA_DIR across a restart
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        assert client.get("/api/v1/TOKEN/attributes?sharedKeys=target").json() == {"shared": {"target": 21.5}}


def test_device_state_records_for_http_activity_and_inactivity(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(device_inactivity_timeout_seconds="1")
    gateway.add_device("boiler-17", "TOKEN")
    gateway.start()
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        for _ in range(3):
            assert client.post("/api/v1/TOKEN/telemetry", json={"t": 1}).status_code == 200
    states = wait_for(gateway, "device_state", 2, timeout_s=15)
    assert [(s["values"]["event"], s["values"]["active"], s["transport"]) for s in states] == [
        ("activity", True, "http"),
        ("inactivity", False, "http"),
    ]
    activity, inactivity = (s["values"] for s in states)
    assert activity["lastActivityTime"] is not None and activity["lastConnectTime"] is None
    assert inactivity["lastActivityTime"] >= activity["lastActivityTime"]
    assert 900 <= states[1]["ts"] - inactivity["lastActivityTime"] < 5000
    shown = [orjson.loads(line)["kind"] for line in gateway.cli("messages", "--json").stdout.splitlines()]
    assert shown == ["telemetry"] * 3  # what devices sent; state records on request
    every = [orjson.loads(line)["kind"] for line in gateway.cli("messages", "--json", "--all").stdout.splitlines()]
    assert sorted(every) == ["device_state"] * 2 + ["telemetry"] * 3
    device = httpx.get(f"http://127.0.0.1:{admin_port(gateway)}/api/devices/boiler-17", timeout=5).json()
    assert device["state"]["active"] is False and device["sessions"] == []
