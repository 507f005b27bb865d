"""End to end over CoAP (real `tb-gateway run`, libcoap's client): a device over its rate limit gets 4.29 with
Max-Age (RFC 8516); an address blocked for wrong credentials gets 4.29 with the time left, unchecked."""

from __future__ import annotations

import re
import subprocess

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "COAP_LIMITED_TOKEN"


def coap_post(gateway: GatewayProcess, token: str = TOKEN, body: str = '{"t":1}') -> tuple[str, int | None]:
    """(response code, Max-Age or None), from libcoap's client printing every message (-v 6)."""
    uri = f"coap://127.0.0.1:{gateway.coap_port}/api/v1/{token}/telemetry"
    result = subprocess.run(
        ["coap-client-notls", "-v", "6", "-B", "10", "-m", "post", "-e", body, uri],
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = result.stdout + result.stderr
    code = re.search(r"t:ACK c:(\d\.\d\d)", out)
    assert code is not None, out
    max_age = re.search(r"Max-Age:(\d+)", out)
    return code.group(1), int(max_age.group(1)) if max_age else None


def telemetry(gateway: GatewayProcess) -> list[dict[str, object]]:
    records = [orjson.loads(line) for line in gateway.cli("messages", "--json").stdout.splitlines()]
    return [r for r in records if r["kind"] == "telemetry"]


def metric(gateway: GatewayProcess, line: str) -> bool:
    return line in httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text


def test_rate_limited_device_gets_4_29_with_max_age(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(rate_limit_enabled="true", rate_limit_device_messages="2:60").start()
    gw.add_device("limited", TOKEN)
    answers = [coap_post(gw) for _ in range(4)]
    assert answers[:2] == [("2.01", None), ("2.01", None)]
    for code, max_age in answers[2:]:
        assert code == "4.29" and max_age is not None and 25 <= max_age <= 30  # one message per 30 s
    assert len(telemetry(gw)) == 2  # refused before admission
    assert metric(gw, 'tb_gateway_rate_limited_total{limit="messages",transport="coap"} 2.0')
    assert gw.log().count("refused a message from device limited over coap: rate_limited") == 1  # one per window


def test_max_age_is_for_the_refused_message_and_4_13_when_it_never_passes(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(rate_limit_enabled="true", rate_limit_device_telemetry_data_points="6:3").start()
    gw.add_device("limited", TOKEN)
    gw.add_device("other", "COAP_OTHER_TOKEN")
    six = orjson.dumps({f"k{i}": i for i in range(6)}).decode()
    assert coap_post(gw, body=six) == ("2.01", None)
    code, max_age = coap_post(gw, body=six)
    assert code == "4.29" and max_age == 3  # 6 points at 2 per second (one point: 1 s)
    seven = orjson.dumps({f"k{i}": i for i in range(7)}).decode()
    assert coap_post(gw, "COAP_OTHER_TOKEN", seven) == ("4.13", None)  # 7 points > capacity 6: never passes
    assert len(telemetry(gw)) == 1
    assert metric(gw, 'tb_gateway_rate_limited_total{limit="telemetry_data_points",transport="coap"} 2.0')


def test_blocked_address_gets_4_29_and_no_lookup(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(
        ip_block_enabled="true", ip_block_max_wrong_credentials="3", ip_block_timeout_seconds="60"
    ).start()
    gw.add_device("good", TOKEN)
    assert coap_post(gw)[0] == "2.01"
    assert [coap_post(gw, f"WRONG{i}")[0] for i in range(3)] == ["4.01"] * 3
    code, max_age = coap_post(gw)  # even the right token: the address is blocked
    assert code == "4.29" and max_age is not None and 55 <= max_age <= 60
    assert metric(gw, 'tb_gateway_auth_blocked_total{transport="coap"} 1.0')
    assert metric(gw, 'tb_gateway_auth_failures_total{transport="coap"} 3.0')
    assert "address 127.0.0.1 blocked for 60 s after 3 wrong credentials" in gw.log()


def test_protection_is_off_by_default(gateway: GatewayProcess) -> None:
    gateway.add_device("free", TOKEN)
    assert [coap_post(gateway, f"WRONG{i}")[0] for i in range(12)] == ["4.01"] * 12
    assert [coap_post(gateway)[0] for _ in range(3)] == ["2.01"] * 3
