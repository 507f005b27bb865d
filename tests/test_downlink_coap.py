"""CoAP downlink end to end (spec §4): libcoap's `coap-client-notls -s` and aiocoap observing RPC and shared
attributes on the real `tb-gateway run` process, RPCs and attributes sent with the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from typing import Any

import aiocoap
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

TOKEN = "COAP_DL_TOKEN"


def start(gateway_factory: GatewayFactory, **settings: str) -> GatewayProcess:
    gateway = gateway_factory(**settings)
    gateway.add_device("thermostat-1", TOKEN)
    return gateway.start()


def uri(gateway: GatewayProcess, path: str) -> str:
    return f"coap://127.0.0.1:{gateway.coap_port}/api/v1/{TOKEN}/{path}"


class Cli(threading.Thread):
    """`tb-gateway rpc ...` in the background: it blocks until the device replied or the RPC expired."""

    def __init__(self, gateway: GatewayProcess, *args: str) -> None:
        super().__init__(daemon=True)
        self.gateway, self.args = gateway, args
        self.result: subprocess.CompletedProcess[str] | None = None
        self.start()

    def run(self) -> None:
        self.result = self.gateway.cli("rpc", *self.args, check=False, timeout_s=60)

    def outcome(self) -> subprocess.CompletedProcess[str]:
        self.join(60)
        assert self.result is not None
        return self.result


def observe_rpc(gateway: GatewayProcess, verbosity: int) -> subprocess.Popen[str]:
    """libcoap observing the device's RPC resource for 30 s, its log on stdout."""
    return subprocess.Popen(
        ["coap-client-notls", "-v", str(verbosity), "-w", "-s", "30", "-B", "30", "-m", "get", uri(gateway, "rpc")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float = 20.0) -> str:
    """Lines of a running libcoap client until one contains ``needle``."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if needle in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"{needle!r} not seen in:\n{seen}")


def records(gateway: GatewayProcess, kind: str) -> list[dict[str, Any]]:
    out = gateway.cli("messages", "--json", "--kind", kind).stdout.splitlines()
    return [orjson.loads(line) for line in out]


def test_libcoap_observes_rpc_and_replies(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    pending = Cli(gateway, "thermostat-1", "setGpio", '{"pin": 4, "value": 1}', "--timeout", "30")
    time.sleep(0.5)  # sent before the device observes: it waits for it
    observer = observe_rpc(gateway, verbosity=6)
    try:
        seen = read_until(observer, '"method":"setGpio"')
        assert "c:2.03" in seen, seen  # the registration is answered 2.03 Valid
        assert '{"id":1,"method":"setGpio","params":{"pin":4,"value":1}}' in seen
        assert "c:2.05" in seen.split("c:2.03", 1)[1]  # then the RPC as a 2.05 notification
        reply = subprocess.run(
            [
                "coap-client-notls",
                "-B",
                "10",
                "-m",
                "post",
                "-e",
                '{"pin":4,"value":1,"ok":true}',
                uri(gateway, "rpc/1"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "4." not in reply.stdout + reply.stderr
        result = pending.outcome()
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout) == {"pin": 4, "value": 1, "ok": True}

        # a second RPC goes straight to the open observation; an unknown reply id is 4.04
        second = Cli(gateway, "thermostat-1", "reboot", "--oneway", "--timeout", "30")
        read_until(observer, '"method":"reboot"')
        assert second.outcome().stdout.strip() == "delivered"
        unknown = subprocess.run(
            ["coap-client-notls", "-B", "10", "-m", "post", "-e", "{}", uri(gateway, "rpc/99")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "4.04" in unknown.stdout + unknown.stderr
    finally:
        observer.kill()
        observer.communicate()  # waits, and closes the pipe
    steps = [(r["values"]["id"], r["values"]["status"], r["transport"]) for r in records(gateway, "rpc_response")]
    assert steps == [(1, "delivered", "coap"), (1, "replied", "coap"), (2, "delivered", "coap")]


def test_libcoap_answers_the_observer_pings_and_keeps_its_observation(gateway_factory: GatewayFactory) -> None:
    """COAP_OBSERVER_CHECK_SECONDS (docs/coap.md Limits): a real client answers the empty CON with a RST, and its
    observation, pinged several times, still carries RPCs."""
    gateway = start(gateway_factory, COAP_OBSERVER_CHECK_SECONDS="1")
    observer = observe_rpc(gateway, verbosity=7)  # 7: libcoap logs every PDU, the pings among them
    try:
        read_until(observer, "c:2.03")
        time.sleep(3.5)  # three checks, each a ping answered
        late = Cli(gateway, "thermostat-1", "afterPings", "--oneway", "--timeout", "30")
        seen = read_until(observer, '"method":"afterPings"')
        assert late.outcome().stdout.strip() == "delivered"
        assert seen.count("t:CON c:0.00") >= 2, seen  # the pings, as libcoap logs them
    finally:
        observer.kill()
        observer.communicate()


def test_rpc_observe_needs_observe_and_a_known_token(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)

    async def main() -> list[Any]:
        context = await aiocoap.Context.create_client_context()
        try:
            plain = await context.request(aiocoap.Message(code=aiocoap.GET, uri=uri(gateway, "rpc"))).response
            bad = aiocoap.Message(code=aiocoap.GET, uri=uri(gateway, "rpc").replace(TOKEN, "WRONG"), observe=0)
            wrong = await context.request(bad).response
            reply = aiocoap.Message(code=aiocoap.POST, uri=uri(gateway, "rpc/x"), payload=b"{}")
            not_int = await context.request(reply).response
            return [plain.code, wrong.code, not_int.code]
        finally:
            await context.shutdown()

    assert asyncio.run(main()) == [aiocoap.BAD_REQUEST, aiocoap.UNAUTHORIZED, aiocoap.BAD_REQUEST]


def test_aiocoap_observes_shared_attributes(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    gateway.cli("attributes", "set", "thermostat-1", "target=21.5")

    async def main() -> list[Any]:
        context = await aiocoap.Context.create_client_context()
        try:
            request = context.request(aiocoap.Message(code=aiocoap.GET, uri=uri(gateway, "attributes"), observe=0))
            first = await request.response
            notifications = [(first.code, orjson.loads(first.payload))]

            async def collect() -> None:  # aiocoap only queues notifications for a running iteration
                async for update in request.observation:
                    notifications.append((update.code, orjson.loads(update.payload)))
                    if len(notifications) == 3:
                        return

            async with asyncio.TaskGroup() as tasks:
                collector = tasks.create_task(collect())
                await asyncio.sleep(0.1)
                loop = asyncio.get_running_loop()
                change = ("attributes", "set", "thermostat-1", "mode=eco", "target=22")
                await loop.run_in_executor(None, lambda: gateway.cli(*change))
                await loop.run_in_executor(None, lambda: gateway.cli("attributes", "delete", "thermostat-1", "mode"))
                await asyncio.wait_for(collector, 10)
            request.observation.cancel()
            return notifications
        finally:
            await context.shutdown()

    assert asyncio.run(main()) == [
        (aiocoap.CONTENT, {"target": 21.5}),  # first notification: every current shared attribute, flat
        (aiocoap.CONTENT, {"mode": "eco", "target": 22}),
        (aiocoap.CONTENT, {"deleted": ["mode"]}),
    ]


def test_client_side_rpc_over_coap(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory, client_side_rpc_timeout_seconds="0.5")

    async def main() -> list[Any]:
        context = await aiocoap.Context.create_client_context()
        try:
            answers = []
            for body in (b'{"method":"getSessionLimits","params":{}}', b'{"method":"getTime","params":{}}', b"[1]"):
                message = aiocoap.Message(code=aiocoap.POST, uri=uri(gateway, "rpc"), payload=body)
                response = await context.request(message).response
                answers.append((response.code, response.payload))
            return answers
        finally:
            await context.shutdown()

    limits, timeout, bad = asyncio.run(main())
    assert limits[0] == aiocoap.CONTENT and orjson.loads(limits[1])["maxPayloadSize"] == 65536
    assert timeout == (aiocoap.CONTENT, b'{"error":"timeout"}')  # no backend on the embedded default
    assert bad[0] == aiocoap.BAD_REQUEST
    [request] = records(gateway, "rpc_request")  # getSessionLimits stays local
    assert request["values"]["method"] == "getTime" and request["transport"] == "coap"


def test_an_open_observation_does_not_keep_a_silent_device_active(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory, device_inactivity_timeout_seconds="1")
    observer = subprocess.Popen(
        ["coap-client-notls", "-s", "20", "-B", "20", "-m", "get", uri(gateway, "rpc")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while len(records(gateway, "device_state")) < 2:
            assert time.monotonic() < deadline, records(gateway, "device_state")
            time.sleep(0.2)
        assert observer.poll() is None  # still observing
    finally:
        observer.kill()
        observer.wait()
    states = [(r["values"]["event"], r["values"]["active"]) for r in records(gateway, "device_state")]
    assert states == [("activity", True), ("inactivity", False)]


def test_observe_1_deregisters_with_2_02(gateway_factory: GatewayFactory) -> None:
    import socket

    from tb_gateway.coap.codec import CON, Code, Message, Option, decode, encode, encode_uint

    gateway = start(gateway_factory)
    path = tuple((Option.URI_PATH, part.encode()) for part in ("api", "v1", TOKEN, "rpc"))

    def get(sock: socket.socket, mid: int, observe: int) -> int:
        options = ((Option.OBSERVE, encode_uint(observe)), *path)
        sock.sendto(encode(Message(CON, Code.GET, mid, b"\x07\x07", options)), ("127.0.0.1", gateway.coap_port))
        return decode(sock.recv(2048)).code

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        assert get(sock, 1, 0) == Code.VALID  # registered
        assert get(sock, 2, 1) == Code.DELETED  # deregistered
    result = gateway.cli("rpc", "thermostat-1", "m", "--timeout", "0.5", check=False)
    assert result.returncode == 1 and "expired" in result.stderr  # no observer any more
