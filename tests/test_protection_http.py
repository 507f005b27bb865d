"""End to end over HTTP (real `tb-gateway run`, curl and httpx): 429 + Retry-After for a device over its rate
limit and for an address blocked after wrong credentials — the block shared by every transport."""

from __future__ import annotations

import subprocess
import time

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "HTTP_LIMITED_TOKEN"
OTHER = "HTTP_OTHER_TOKEN"


def curl_post(gw: GatewayProcess, token: str, body: str, feature: str = "telemetry") -> tuple[int, dict[str, str], str]:
    """(status, headers, body) as curl saw them, on a fresh connection."""
    out = subprocess.run(
        ["curl", "-s", "-i", "-X", "POST", f"{gw.base_url}/api/v1/{token}/{feature}", "-d", body],
        capture_output=True,
        timeout=30,
    ).stdout.decode()
    head, _, text = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, text


def telemetry(gw: GatewayProcess) -> list[dict[str, object]]:
    records = [orjson.loads(line) for line in gw.cli("messages", "--json").stdout.splitlines()]
    return [r for r in records if r["kind"] == "telemetry"]


def metrics(gw: GatewayProcess) -> str:
    return httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text


def test_rate_limited_device_gets_429_with_retry_after(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(
        rate_limit_enabled="true",
        rate_limit_device_messages="3:60",
        rate_limit_device_telemetry_data_points="5:60",
    ).start()
    gw.add_device("limited", TOKEN)
    gw.add_device("other", OTHER)
    assert curl_post(gw, TOKEN, '{"a":1,"b":2,"c":3,"d":4}')[0] == 200
    status, headers, body = curl_post(gw, TOKEN, '{"e":5,"f":6}')  # 6 data points > 5 per minute
    assert status == 429 and orjson.loads(body) == {"error": "rate_limited"}
    assert 1 <= int(headers["retry-after"]) <= 12  # 5 points per 60 s: one more point in 12 s
    assert curl_post(gw, TOKEN, '{"fw":"1.0"}', "attributes")[0] == 200  # not telemetry: only the message limit
    assert curl_post(gw, TOKEN, '{"e":5}')[0] == 200  # the third message, the fifth point
    status, headers, _ = curl_post(gw, TOKEN, "{}")  # the messages limit now: 3 per minute
    assert status == 429 and 15 <= int(headers["retry-after"]) <= 20
    with httpx.Client(base_url=gw.base_url) as keep_alive:  # the same answers on a kept-alive connection
        assert [keep_alive.post(f"/api/v1/{TOKEN}/telemetry", json={"x": 1}).status_code for _ in range(3)] == [429] * 3
        assert keep_alive.post(f"/api/v1/{OTHER}/telemetry", json={"x": 1}).status_code == 200  # per device
    assert [r["values"] for r in telemetry(gw)] == [{"a": 1, "b": 2, "c": 3, "d": 4}, {"e": 5}, {"x": 1}]
    text = metrics(gw)
    assert 'tb_gateway_rate_limited_total{limit="telemetry_data_points",transport="http"} 1.0' in text
    assert 'tb_gateway_rate_limited_total{limit="messages",transport="http"} 4.0' in text
    assert gw.log().count("refused a message from device limited over http: rate_limited") == 1


def test_retry_after_is_for_the_refused_message_and_413_when_it_never_passes(gateway_factory: GatewayFactory) -> None:
    """Data points: Retry-After is the wait for the refused message's own points (not one point's), so the
    device that waits that long gets in; a message with more points than the bucket holds gets 413."""
    gw = gateway_factory(rate_limit_enabled="true", rate_limit_device_telemetry_data_points="6:3").start()
    gw.add_device("limited", TOKEN)
    gw.add_device("other", OTHER)
    six = orjson.dumps({f"k{i}": i for i in range(6)}).decode()
    assert curl_post(gw, TOKEN, six)[0] == 200
    status, headers, _ = curl_post(gw, TOKEN, six)
    assert status == 429 and int(headers["retry-after"]) == 3  # 6 points at 2 per second (one point: 1 s)
    time.sleep(int(headers["retry-after"]))
    assert curl_post(gw, TOKEN, six)[0] == 200  # waited as told: it passes
    seven = orjson.dumps({f"k{i}": i for i in range(7)}).decode()
    status, headers, body = curl_post(gw, OTHER, seven)  # a fresh device, but 7 points > capacity 6
    assert status == 413 and "retry-after" not in headers
    assert orjson.loads(body) == {"error": "rate_limited: more data points than the rate limit allows in one message"}
    with httpx.Client(base_url=gw.base_url) as keep_alive:  # answered, and the connection carries on
        assert keep_alive.post(f"/api/v1/{OTHER}/telemetry", content=seven).status_code == 413
        assert keep_alive.post(f"/api/v1/{OTHER}/telemetry", content=six).status_code == 200
    assert 'tb_gateway_rate_limited_total{limit="telemetry_data_points",transport="http"} 3.0' in metrics(gw)


def test_blocked_address_gets_429_on_every_transport(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(
        ip_block_enabled="true", ip_block_max_wrong_credentials="3", ip_block_timeout_seconds="60"
    ).start()
    gw.add_device("good", TOKEN)
    assert curl_post(gw, TOKEN, "{}")[0] == 200
    with httpx.Client(base_url=gw.base_url) as client:
        codes = [client.post(f"/api/v1/GUESS{i}/telemetry", json={}).status_code for i in range(3)]
        assert codes == [401, 401, 401]
        blocked = client.post(f"/api/v1/{TOKEN}/telemetry", json={})  # right token, blocked address
        assert blocked.status_code == 429 and blocked.json() == {"error": "address blocked"}
        assert 55 <= int(blocked.headers["retry-after"]) <= 60
    assert curl_post(gw, "GUESS9", "{}")[0] == 429  # a new connection, an unknown token: still not looked up
    coap = subprocess.run(
        [
            "coap-client-notls",
            "-B",
            "5",
            "-m",
            "post",
            "-e",
            "{}",
            f"coap://127.0.0.1:{gw.coap_port}/api/v1/{TOKEN}/telemetry",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "4.29" in coap.stdout + coap.stderr  # the count is per address, whatever the transport
    text = metrics(gw)
    assert 'tb_gateway_auth_blocked_total{transport="http"} 2.0' in text
    assert 'tb_gateway_auth_failures_total{transport="http"} 3.0' in text
    assert 'tb_gateway_refusals_total{reason="address_blocked",transport="http"} 2.0' in text
