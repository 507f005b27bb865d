"""End to end: the real `tb-gateway run` forwarding to the ThingsBoard stand-in, through a backend outage."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess
from tests.tb_standin import ThingsBoardStandIn

pytestmark = pytest.mark.slow

TB_TOKEN = "TB_ONLY_TOKEN"  # known to ThingsBoard only: the gateway learns it with a token check
LOCAL_TOKEN = "LOCAL_TOKEN"  # in the embedded registry too (and in ThingsBoard, which must take its records)


def eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def last_copies(values: list[Any]) -> list[Any]:
    """What the backend ends up with: for a value sent twice (allowed: at least once), the last copy counts."""
    seen: set[Any] = set()
    kept = [v for v in reversed(values) if not (v in seen or seen.add(v))]
    return kept[::-1]


def start(gateway_factory: GatewayFactory, tb: ThingsBoardStandIn) -> GatewayProcess:
    gateway = gateway_factory(
        tb_http_enabled="true",
        tb_host="127.0.0.1",
        tb_port=str(tb.port),
        tb_http_max_retries="1",
        tb_http_retry_backoff_ms="20",
        tb_http_timeout_seconds="2",
    )
    # registered before start: a registry change while running empties the whole credential cache, and a
    # token known only to ThingsBoard could then not be checked again during the outage below
    gateway.data_dir.mkdir(parents=True, exist_ok=True)
    gateway.add_device("boiler", LOCAL_TOKEN)
    return gateway.start()


def health(gateway: GatewayProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{gateway.base_url}/health", timeout=10).json()
    return body


def test_records_reach_thingsboard_and_an_outage_loses_nothing(gateway_factory: GatewayFactory) -> None:
    with ThingsBoardStandIn((TB_TOKEN, LOCAL_TOKEN)) as tb:
        gateway = start(gateway_factory, tb)
        sent: dict[str, list[int]] = {TB_TOKEN: [], LOCAL_TOKEN: []}
        with httpx.Client(base_url=gateway.base_url, timeout=30) as client:

            def post(token: str, n: int) -> None:
                response = client.post(
                    f"/api/v1/{token}/telemetry", json={"ts": 1_700_000_000_000 + n, "values": {"n": n}}
                )
                assert (response.status_code, response.text) == (200, "")
                sent[token].append(n)

            for n in range(10):
                post(TB_TOKEN, n)
                post(LOCAL_TOKEN, n)
            attributes = client.post(f"/api/v1/{TB_TOKEN}/attributes", json={"fw": "v1.0"})
            assert attributes.status_code == 200
            eventually(lambda: len(tb.telemetry(TB_TOKEN)) >= 10 and len(tb.telemetry(LOCAL_TOKEN)) >= 10)
            assert tb.client_attributes(TB_TOKEN) == {"fw": "v1.0"}
            token_checks = [a for a in tb.answered if a.method == "GET"]
            assert [a.path for a in token_checks] == [f"/api/v1/{TB_TOKEN}/attributes"]  # once: cached after

            unknown = client.post("/api/v1/NOBODY/telemetry", json={"n": 1})
            assert unknown.status_code == 401
            assert tb.answered[-1].path == "/api/v1/NOBODY/attributes" and tb.answered[-1].status == 401

            tb.go_down("refuse")
            for n in range(10, 40):  # acked while ThingsBoard is unreachable: spooled, fsynced
                post(TB_TOKEN, n)
                post(LOCAL_TOKEN, n)
            during = health(gateway)["components"]["sink"]
            assert during["status"] in ("degraded", "down") and during["spool"]["records"] > 0

            tb.come_back()
            for n in range(40, 50):
                post(TB_TOKEN, n)
                post(LOCAL_TOKEN, n)
            eventually(lambda: all(len(tb.telemetry(t)) >= 50 for t in sent))
            eventually(lambda: health(gateway)["components"]["sink"]["status"] == "up")

        for token, numbers in sent.items():
            arrived = [entry["values"]["n"] for entry in tb.telemetry(token)]
            assert last_copies(arrived) == numbers  # nothing lost, per-device order kept
            assert {entry["ts"] - 1_700_000_000_000 for entry in tb.telemetry(token)} == set(numbers)
        metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).text
        assert 'tb_gateway_thingsboard_requests_total{endpoint="telemetry",result="200"}' in metrics
        assert 'tb_gateway_thingsboard_requests_total{endpoint="auth",result="401"} 1.0' in metrics
        assert gateway.stop() == 0
        assert '"level":"ERROR"' not in gateway.log()  # e.g. no connection pool left unclosed at shutdown


def test_records_spooled_during_an_outage_survive_kill_9(gateway_factory: GatewayFactory) -> None:
    """Acked while ThingsBoard is down, then the gateway is killed: the restarted gateway replays them."""
    with ThingsBoardStandIn((TB_TOKEN, LOCAL_TOKEN)) as tb:
        gateway = start(gateway_factory, tb)
        with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
            assert client.post(f"/api/v1/{LOCAL_TOKEN}/telemetry", json={"n": 0}).status_code == 200
            tb.go_down("refuse")
            for n in range(1, 21):
                response = client.post(f"/api/v1/{LOCAL_TOKEN}/telemetry", json={"n": n})
                assert response.status_code == 200
        gateway.kill9()
        tb.come_back()
        gateway.start()
        eventually(lambda: len(tb.telemetry(LOCAL_TOKEN)) >= 21)
        assert last_copies([e["values"]["n"] for e in tb.telemetry(LOCAL_TOKEN)]) == list(range(21))
        assert gateway.stop() == 0
        assert '"level":"ERROR"' not in gateway.log()
