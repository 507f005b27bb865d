"""HTTP downlink end to end (spec §3): curl and httpx long-polling RPC and shared attributes on the real
`tb-gateway run` process, RPCs and attributes sent with the CLI; RPC replies and client-side RPC."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "HTTP_DL_TOKEN"


def start(gateway_factory: GatewayFactory, **settings: str) -> GatewayProcess:
    gateway = gateway_factory(**settings)
    gateway.add_device("meter-9", TOKEN)
    return gateway.start()


class Background(threading.Thread):
    """Runs a blocking call (the CLI, curl) and keeps its result."""

    def __init__(self, call: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self.call, self.args, self.result = call, args, None
        self.start()

    def run(self) -> None:
        self.result = self.call(*self.args)

    def outcome(self) -> Any:
        self.join(60)
        assert not self.is_alive()
        return self.result


def curl(*args: str) -> tuple[int, str]:
    """``curl`` printing the body and then the status code on its own line."""
    out = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def rpc_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return gateway.cli("rpc", *args, check=False, timeout_s=60)


def records(gateway: GatewayProcess, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gateway.cli("messages", "--json", "--kind", kind).stdout.splitlines()]


def test_curl_long_polls_an_rpc_and_replies(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    url = f"{gateway.base_url}/api/v1/{TOKEN}"
    poll = Background(curl, f"{url}/rpc?timeout=20000")
    time.sleep(0.5)
    cli = Background(rpc_cli, gateway, "meter-9", "setRelay", '{"on": true}', "--timeout", "20")
    assert poll.outcome() == (200, '{"id":1,"method":"setRelay","params":{"on":true}}')
    assert curl("-X", "POST", "-d", '{"relay":"on"}', f"{url}/rpc/1") == (200, "")
    result = cli.outcome()
    assert result.returncode == 0 and orjson.loads(result.stdout) == {"relay": "on"}
    assert curl("-X", "POST", "-d", "{}", f"{url}/rpc/1")[0] == 404  # answered already
    assert curl("-X", "POST", "-d", "{}", f"{url}/rpc/one")[0] == 400
    assert curl("-X", "POST", "-d", "{}", f"{gateway.base_url}/api/v1/WRONG/rpc/1")[0] == 401
    steps = [(r["values"]["status"], r["transport"]) for r in records(gateway, "rpc_response")]
    assert steps == [("delivered", "http"), ("replied", "http")]


def test_long_poll_times_out_with_408_and_a_waiting_rpc_is_answered_at_once(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    url = f"{gateway.base_url}/api/v1/{TOKEN}"
    started = time.monotonic()
    assert curl(f"{url}/rpc?timeout=300") == (408, "")
    assert 0.25 < time.monotonic() - started < 5
    assert curl(f"{url}/rpc?timeout=soon")[0] == 400
    cli = Background(rpc_cli, gateway, "meter-9", "reboot", "--oneway", "--timeout", "20")
    time.sleep(0.5)  # queued before the device polls
    assert curl(f"{url}/rpc?timeout=20000") == (200, '{"id":1,"method":"reboot","params":null}')
    assert cli.outcome().stdout.strip() == "delivered"


def test_a_poll_whose_client_left_is_not_handed_an_rpc(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    url = f"{gateway.base_url}/api/v1/{TOKEN}"
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the server's 20 s
        httpx.get(f"{url}/rpc?timeout=20000", timeout=0.5)
    time.sleep(0.3)
    cli = Background(rpc_cli, gateway, "meter-9", "ping", "--timeout", "20")
    time.sleep(0.5)
    assert curl(f"{url}/rpc?timeout=20000") == (200, '{"id":1,"method":"ping","params":null}')
    assert curl("-X", "POST", "-d", '"pong"', f"{url}/rpc/1") == (200, "")
    assert cli.outcome().stdout.strip() == '"pong"'


def test_curl_long_polls_shared_attribute_updates(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    url = f"{gateway.base_url}/api/v1/{TOKEN}/attributes/updates?timeout=20000"
    poll = Background(curl, url)
    time.sleep(0.5)
    gateway.cli("attributes", "set", "meter-9", "interval=30", "unit=kWh")
    assert poll.outcome() == (200, '{"interval":30,"unit":"kWh"}')
    poll = Background(curl, url)
    time.sleep(0.5)
    gateway.cli("attributes", "delete", "meter-9", "unit")
    assert poll.outcome() == (200, '{"deleted":["unit"]}')
    assert curl(url.replace("20000", "200")) == (408, "")


def test_client_side_rpc_over_http(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory, client_side_rpc_timeout_seconds="0.5")
    url = f"{gateway.base_url}/api/v1/{TOKEN}/rpc"
    with httpx.Client(timeout=10, trust_env=False) as client:
        limits = client.post(url, json={"method": "getSessionLimits", "params": {}})
        assert limits.status_code == 200 and limits.json()["maxPayloadSize"] == 65536
        timeout = client.post(url, json={"method": "getTime", "params": {"tz": "UTC"}})
        assert (timeout.status_code, timeout.json()) == (200, {"error": "timeout"})
        assert client.post(url, content=b"[1]").status_code == 400
        assert client.post(url, content=b"{bad").status_code == 400
    [request] = records(gateway, "rpc_request")
    assert request["values"]["method"] == "getTime" and request["values"]["params"] == {"tz": "UTC"}
