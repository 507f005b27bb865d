"""MQTT downlink end to end (spec §1.7-§1.9, §1.13): paho-mqtt 5 and ThingsBoard's `tb-mqtt-client` SDK on the
real `tb-gateway run` process, RPCs and shared attributes sent with the CLI; device state records."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SDK_PYTHON = ROOT / ".cache" / "tb-sdk-venv" / "bin" / "python"
TOKEN = "MQTT_DL_TOKEN"


class Device:
    """A paho-mqtt client in its own thread, collecting what arrives."""

    def __init__(self, gateway: GatewayProcess, protocol: int = paho.MQTTv5, token: str = TOKEN) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.ready = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=protocol)
        self.client.username_pw_set(token)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", gateway.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.ready:
            self.messages.append((message.topic, orjson.loads(message.payload)))
            self.ready.notify_all()

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe([(f, qos) for f in filters])
        assert done.wait(10)

    def next_message(self, count: int, timeout_s: float = 15.0) -> tuple[str, Any]:
        with self.ready:
            assert self.ready.wait_for(lambda: len(self.messages) >= count, timeout_s), self.messages
            return self.messages[count - 1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Background(threading.Thread):
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


def start(gateway_factory: GatewayFactory, **settings: str) -> GatewayProcess:
    gateway = gateway_factory(**settings)
    gateway.add_device("valve-5", TOKEN)
    return gateway.start()


def rpc_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return gateway.cli("rpc", "valve-5", *args, check=False, timeout_s=60)


def records(gateway: GatewayProcess, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gateway.cli("messages", "--json", "--kind", kind).stdout.splitlines()]


def wait_records(gateway: GatewayProcess, kind: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while len(found := records(gateway, kind)) < count:
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    return found


def test_paho5_gets_rpc_and_shared_attributes_and_replies(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    waiting = Background(rpc_cli, gateway, "setValve", '{"open": 40}', "--timeout", "30")
    time.sleep(0.5)  # queued before the device connects
    device = Device(gateway)
    try:
        device.subscribe("v1/devices/me/rpc/request/+", "v1/devices/me/attributes")
        assert device.next_message(1) == ("v1/devices/me/rpc/request/1", {"method": "setValve", "params": {"open": 40}})
        device.client.publish("v1/devices/me/rpc/response/1", '{"open": 40, "ok": true}', qos=1)
        result = waiting.outcome()
        assert result.returncode == 0 and orjson.loads(result.stdout) == {"open": 40, "ok": True}

        gateway.cli("attributes", "set", "valve-5", "limit=80", "mode=auto")
        assert device.next_message(2) == ("v1/devices/me/attributes", {"limit": 80, "mode": "auto"})
        gateway.cli("attributes", "delete", "valve-5", "mode")
        assert device.next_message(3) == ("v1/devices/me/attributes", {"deleted": ["mode"]})

        oneway = Background(rpc_cli, gateway, "blink", "--oneway")
        assert device.next_message(4) == ("v1/devices/me/rpc/request/2", {"method": "blink", "params": None})
        assert oneway.outcome().stdout.strip() == "delivered"
    finally:
        device.close()
    steps = [(r["values"]["id"], r["values"]["status"]) for r in wait_records(gateway, "rpc_response", 3)]
    assert steps == [(1, "delivered"), (1, "replied"), (2, "delivered")]  # delivered = the device's PUBACK
    states = wait_records(gateway, "device_state", 2)
    assert [(s["values"]["event"], s["values"]["active"], s["transport"]) for s in states] == [
        ("connect", True, "mqtt"),
        ("disconnect", False, "mqtt"),
    ]
    assert states[1]["values"]["lastConnectTime"] == states[0]["values"]["lastConnectTime"]


def test_short_v2_topics_and_qos0(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    device = Device(gateway)
    try:
        device.subscribe("v2/r/req/+", "v2/a", qos=0)
        waiting = Background(rpc_cli, gateway, "ping", "--timeout", "30")
        topic, body = device.next_message(1)
        assert (topic, body) == ("v2/r/req/1", {"method": "ping", "params": None})
        device.client.publish("v2/r/res/1", '"pong"', qos=1)
        assert waiting.outcome().stdout.strip() == '"pong"'
        gateway.cli("attributes", "set", "valve-5", "limit=10")
        assert device.next_message(2) == ("v2/a", {"limit": 10})
        device.client.unsubscribe("v2/r/req/+")
        time.sleep(0.3)
        expired = rpc_cli(gateway, "ignored", "--timeout", "0.5")  # no RPC subscription any more: it waits, expires
        assert expired.returncode == 1 and "expired" in expired.stderr
    finally:
        device.close()
    steps = [r["values"]["status"] for r in wait_records(gateway, "rpc_response", 3)]
    assert steps == ["delivered", "replied", "expired"]  # QoS 0: delivered when written


def test_late_or_unknown_replies_are_acknowledged_and_dropped(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory)
    device = Device(gateway)
    try:
        acked = threading.Event()
        device.client.on_publish = lambda *args: acked.set()
        device.client.publish("v1/devices/me/rpc/response/77", "{}", qos=1)
        assert acked.wait(10)  # PUBACKed as ThingsBoard does; nothing was waiting for it
    finally:
        device.close()
    assert records(gateway, "rpc_response") == []


@pytest.mark.skipif(not SDK_PYTHON.exists(), reason="run `make deps` (scripts/tb-sdk-venv.sh) first")
def test_thingsboard_sdk_downlink(gateway_factory: GatewayFactory) -> None:
    gateway = start(gateway_factory, client_side_rpc_timeout_seconds="1")
    gateway.cli("attributes", "set", "valve-5", "target=21.5")
    script = str(ROOT / "tests" / "mqtt_sdk_downlink.py")
    sdk = subprocess.Popen(
        [str(SDK_PYTHON), script, "127.0.0.1", str(gateway.mqtt_port), TOKEN, "1", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict[str, Any]] = []
    try:
        assert sdk.stdout is not None

        def next_event(name: str) -> dict[str, Any]:
            while True:
                line = sdk.stdout.readline()  # type: ignore[union-attr]
                assert line, f"the SDK ended before {name}: {events}"
                events.append(orjson.loads(line))
                if events[-1]["event"] == name:
                    return events[-1]

        next_event("connected")
        assert next_event("shared")["content"] == {"shared": {"target": 21.5}}  # attribute request
        result = rpc_cli(gateway, "setTarget", '{"target": 23}', "--timeout", "30")
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout) == {"echo": {"target": 23}, "method": "setTarget"}
        gateway.cli("attributes", "set", "valve-5", "target=23")
        assert next_event("attributes")["content"] == {"target": 23}
        client_rpc = next((e for e in events if e["event"] == "client_rpc"), None) or next_event("client_rpc")
        assert client_rpc["content"] == {"error": "timeout"}  # nobody answers on the embedded default
        assert next_event("done")["seen"] == {"rpc": 1, "attributes": 1, "client_rpc": 1}
    finally:
        sdk.kill()
        sdk.communicate()
    rpc_event = next(e for e in events if e["event"] == "rpc")
    assert rpc_event["body"] == {"method": "setTarget", "params": {"target": 23}}
    [request] = records(gateway, "rpc_request")
    assert request["values"]["method"] == "getTime" and request["values"]["params"] == {"tz": "UTC"}


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def test_a_subscribe_sent_before_the_connack_counts(gateway_factory: GatewayFactory) -> None:
    """CONNECT and SUBSCRIBE in one write (the SUBSCRIBE waits in the session until the CONNACK)."""
    import socket

    gateway = start(gateway_factory)
    connect_body = _string("MQTT") + b"\x04\x82\x00\x3c" + _string("") + _string(TOKEN)
    subscribe_body = b"\x00\x01" + _string("v1/devices/me/rpc/request/+") + b"\x01"
    packets = bytes([0x10, len(connect_body)]) + connect_body + bytes([0x82, len(subscribe_body)]) + subscribe_body
    with socket.create_connection(("127.0.0.1", gateway.mqtt_port), timeout=10) as raw:
        raw.sendall(packets)
        got = b""
        while len(got) < 9:  # CONNACK (4 bytes) + SUBACK (5 bytes)
            got += raw.recv(64)
        assert got[:4] == b"\x20\x02\x00\x00" and got[4:9] == b"\x90\x03\x00\x01\x01"
        waiting = Background(rpc_cli, gateway, "hello", "--oneway", "--timeout", "20")
        got = b""
        while b"hello" not in got:
            chunk = raw.recv(256)
            assert chunk, got
            got += chunk
        assert b"v1/devices/me/rpc/request/1" in got
        packet_id = got[2 + 2 + len("v1/devices/me/rpc/request/1") :][:2]
        raw.sendall(b"\x40\x02" + packet_id)  # PUBACK: delivered
        assert waiting.outcome().stdout.strip() == "delivered"


def holders(gateway: GatewayProcess, names: list[str]) -> dict[str, int]:
    """device name -> index of the worker holding its session (asked through each worker's admin API)."""
    import httpx

    ports = [orjson.loads((gateway.data_dir / f).read_bytes())["port"] for f in ("admin.json", "admin-1.json")]
    found = {}
    for index, port in enumerate(ports):
        for name in names:
            if httpx.get(f"http://127.0.0.1:{port}/api/devices/{name}", timeout=5).json()["sessions"]:
                found[name] = index
    return found


def test_with_two_workers_the_cli_reaches_the_worker_holding_the_device(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(workers="2")
    names = [f"valve-{n}" for n in range(16)]
    for name in names:
        gateway.add_device(name, f"TOKEN-{name}")
    gateway.start()
    deadline = time.monotonic() + 20
    while not (gateway.data_dir / "admin-1.json").exists():  # every worker has its own admin API
        assert time.monotonic() < deadline
        time.sleep(0.1)
    devices: dict[str, Device] = {}
    try:
        for name in names:  # connect until the kernel has put devices on both workers
            devices[name] = Device(gateway, token=f"TOKEN-{name}")
            devices[name].subscribe("v1/devices/me/rpc/request/+", "v1/devices/me/attributes")
            if len(devices) >= 2 and len(set(holders(gateway, list(devices)).values())) == 2:
                break
        where = holders(gateway, list(devices))
        assert set(where.values()) == {0, 1} and len(where) == len(devices), where
        for name, device in devices.items():
            waiting = Background(lambda n=name: gateway.cli("rpc", n, "where", "--timeout", "20", check=False))
            topic, body = device.next_message(1)
            assert body == {"method": "where", "params": None}
            device.client.publish(topic.replace("request", "response"), f'"{name}"', qos=1)
            result = waiting.outcome()
            assert result.returncode == 0 and result.stdout.strip() == f'"{name}"', result.stderr
        on_worker_1 = next(name for name, index in where.items() if index == 1)
        gateway.cli("attributes", "set", on_worker_1, "x=1")  # every worker applies it; the holder pushes
        assert devices[on_worker_1].next_message(2) == ("v1/devices/me/attributes", {"x": 1})
    finally:
        for device in devices.values():
            device.close()
