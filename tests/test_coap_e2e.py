"""End to end: the real `tb-gateway run` process on the embedded default, driven over CoAP by libcoap's
``coap-client-notls`` and by the aiocoap client (default asyncio loop), CON and NON, single and block-wise."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import aiocoap
import orjson
import pytest

from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "A1_TEST_TOKEN"


@pytest.fixture
def running(gateway: GatewayProcess) -> GatewayProcess:
    gateway.add_device("thermostat-1", TOKEN)
    return gateway


def stored(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gateway.cli("messages", "--json").stdout.splitlines()]


def coap_client(gateway: GatewayProcess, *args: str, path: str = f"api/v1/{TOKEN}/telemetry") -> str:
    """Run libcoap's client; it exits 0 even on a 4.xx answer, so return what it printed for the caller to check."""
    uri = f"coap://127.0.0.1:{gateway.coap_port}/{path}"
    result = subprocess.run(["coap-client-notls", "-B", "10", *args, uri], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_libcoap_con_and_non_post_telemetry(running: GatewayProcess) -> None:
    # -v 6 makes libcoap print every message it sends and receives
    out = coap_client(running, "-v", "6", "-m", "post", "-t", "json", "-e", '{"temperature":25.5,"humidity":60}')
    assert "t:CON c:POST" in out and "t:ACK c:2.01" in out, out
    out = coap_client(running, "-v", "6", "-N", "-m", "post", "-e", '{"temperature":26}')
    assert "t:NON c:POST" in out and "t:NON c:2.01" in out, out
    records = stored(running)
    assert [(r["device"], r["transport"], r["kind"], r["values"]) for r in records] == [
        ("thermostat-1", "coap", "telemetry", {"temperature": 25.5, "humidity": 60}),
        ("thermostat-1", "coap", "telemetry", {"temperature": 26}),
    ]


def test_libcoap_blockwise_upload(running: GatewayProcess, tmp_path: Path) -> None:
    values = {f"sensor_{i}": i * 1.5 for i in range(60)}
    body = tmp_path / "body.json"
    body.write_bytes(json.dumps(values).encode())
    assert body.stat().st_size > 1024
    out = coap_client(running, "-v", "6", "-m", "post", "-b", "256", "-f", str(body))
    # really block-wise: block 0 of 256 bytes went out, and the 2.01 answers the fifth and last block
    assert "Block1:0/M/256" in out and "t:ACK c:2.01" in out and "Block1:4/_/256" in out, out
    [record] = stored(running)
    assert record["device"] == "thermostat-1" and record["values"] == values


def test_libcoap_sees_error_codes_and_attribute_answers(running: GatewayProcess) -> None:
    out = coap_client(running, "-m", "post", "-e", "{}", path="api/v1/WRONG/telemetry")
    assert "4.01" in out
    out = coap_client(running, "-m", "post", "-e", "{bad", path=f"api/v1/{TOKEN}/telemetry")
    assert "4.00" in out
    out = coap_client(running, "-m", "post", "-e", '{"fw":"v7"}', path=f"api/v1/{TOKEN}/attributes")
    assert "4." not in out, out
    out = coap_client(running, "-m", "get", path=f"api/v1/{TOKEN}/attributes?clientKeys=fw")
    assert orjson.loads(out.strip()) == {"client": {"fw": "v7"}}
    out = coap_client(running, "-m", "get", path=f"api/v1/{TOKEN}/attributes?sharedKeys=none")
    assert "4.04" in out
    assert [r["values"] for r in stored(running)] == [{"fw": "v7"}]


def test_aiocoap_client_con_non_and_blockwise(running: GatewayProcess) -> None:
    big = {f"k{i}": "v" * 30 for i in range(120)}

    async def main() -> list[aiocoap.numbers.codes.Code]:
        context = await aiocoap.Context.create_client_context()
        try:
            uri = f"coap://127.0.0.1:{running.coap_port}/api/v1/{TOKEN}/telemetry"
            codes = []
            for payload, tuning in (
                (b'{"a":1}', aiocoap.Reliable),
                (b'{"a":2}', aiocoap.Unreliable),
                (json.dumps(big).encode(), aiocoap.Reliable),
            ):
                message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload, transport_tuning=tuning)
                codes.append((await context.request(message).response).code)
            return codes
        finally:
            await context.shutdown()

    assert asyncio.run(main()) == [aiocoap.CREATED] * 3
    records = stored(running)
    assert [r["values"] for r in records] == [{"a": 1}, {"a": 2}, big]
    assert {r["device"] for r in records} == {"thermostat-1"}
