"""End to end: the real `tb-gateway run` process, driven over MQTT by mosquitto_pub/sub, paho and the TB SDK."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SDK_PYTHON = ROOT / ".cache" / "tb-sdk-venv" / "bin" / "python"
TELEMETRY = "v1/devices/me/telemetry"


def stored(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gateway.cli("messages", "--json").stdout.splitlines()]


def mosquitto(tool: str, gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(gateway.mqtt_port), *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def running(gateway: GatewayProcess) -> GatewayProcess:
    gateway.add_device("meter-1", "TOKEN_1")
    gateway.add_device("meter-basic", None, "--client-id", "cid-7", "--username", "user-7", "--password", "pw-7")
    return gateway


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients(running: GatewayProcess, version: str) -> None:
    ok = mosquitto(
        "mosquitto_pub", running, "-V", version, "-u", "TOKEN_1", "-q", "1", "-t", TELEMETRY, "-m", '{"kwh":12.5}'
    )
    assert ok.returncode == 0, ok.stderr
    basic = mosquitto(
        "mosquitto_pub", running, "-V", version, "-i", "cid-7", "-u", "user-7", "-P", "pw-7", "-q", "1",
        "-t", "v1/devices/me/attributes", "-m", '{"model":"m7"}',
    )  # fmt: skip
    assert basic.returncode == 0, basic.stderr
    records = stored(running)
    assert [(r["device"], r["kind"], r["values"], r["transport"]) for r in records] == [
        ("meter-1", "telemetry", {"kwh": 12.5}, "mqtt"),
        ("meter-basic", "attributes", {"model": "m7"}, "mqtt"),
    ]
    refused = mosquitto("mosquitto_pub", running, "-V", version, "-u", "WRONG", "-q", "1", "-t", TELEMETRY, "-m", "{}")
    assert refused.returncode != 0
    expected = "bad user name or password" if version == "mqttv5" else "not authorised"
    assert expected in refused.stderr.lower(), refused.stderr
    # a filter ThingsBoard refuses, then one it accepts (the subscriber waits 1 s and times out quietly)
    denied = mosquitto(
        "mosquitto_sub", running, "-V", version, "-u", "TOKEN_1", "-t", "v1/devices/me/rpc/request/#", "-W", "2"
    )
    assert "denied" in (denied.stdout + denied.stderr).lower()
    accepted = mosquitto(
        "mosquitto_sub", running, "-V", version, "-u", "TOKEN_1", "-t", "v1/devices/me/attributes", "-W", "1"
    )
    assert "denied" not in (accepted.stdout + accepted.stderr).lower()
    assert "refused" not in (accepted.stdout + accepted.stderr).lower()
    assert len(stored(running)) == 2


class PahoDevice:
    """paho in its own thread; collects what arrives."""

    def __init__(self, port: int, protocol: int, token: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.acked: dict[int, int] = {}
        self.connack: int | None = None
        self.event = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=protocol)
        self.client.username_pw_set(token)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self.event:
            self.connack = reason.value
            self.event.notify_all()

    def _on_message(self, c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        with self.event:
            self.messages.append(message)
            self.event.notify_all()

    def _on_publish(self, c: paho.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        with self.event:
            self.acked[mid] = reason.value
            self.event.notify_all()

    def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        with self.event:
            assert self.event.wait_for(predicate, timeout), "timed out"

    def publish(self, topic: str, payload: bytes | str) -> int:
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.acked)
        return self.acked[info.mid]

    def message_on(self, topic: str) -> Any:
        self.wait(lambda: any(m.topic == topic for m in self.messages))
        return orjson.loads(next(m for m in self.messages if m.topic == topic).payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_paho_device_session(running: GatewayProcess, protocol: int) -> None:
    device = PahoDevice(running.mqtt_port, protocol, "TOKEN_1")
    try:
        device.wait(lambda: device.connack is not None)
        assert device.connack == 0
        device.client.subscribe([("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 1)])
        assert device.publish(TELEMETRY, '[{"ts":1700000000000,"values":{"v":1}},{"v":2}]') == 0
        assert device.publish("v1/devices/me/attributes", '{"serial":"SN-1"}') == 0
        assert device.publish("v1/devices/me/attributes/request/1", '{"clientKeys":"serial"}') == 0
        assert device.message_on("v1/devices/me/attributes/response/1") == {"client": {"serial": "SN-1"}}
        device.publish("v1/devices/me/rpc/request/1", '{"method":"getSessionLimits","params":{"timeout":5000}}')
        assert device.message_on("v1/devices/me/rpc/response/1")["maxPayloadSize"] == 65536
        assert device.publish("v1/devices/me/unknown", "{}") == (0x90 if protocol == paho.MQTTv5 else 0)
        if protocol == paho.MQTTv5:
            assert device.publish(TELEMETRY, "oops") == 0x99
            assert device.client.is_connected()
    finally:
        device.close()
    values = [(r["kind"], r["ts"], r["values"]) for r in stored(running)]
    assert values[0] == ("telemetry", 1700000000000, {"v": 1})
    assert values[1][0::2] == ("telemetry", {"v": 2})
    assert values[2][0::2] == ("attributes", {"serial": "SN-1"})
    assert len(values) == 3


def test_wrong_token_refused_for_paho(running: GatewayProcess) -> None:
    for protocol, code in ((paho.MQTTv311, 0x87), (paho.MQTTv5, 0x86)):  # paho shows 3.1.1's code 5 as 0x87
        device = PahoDevice(running.mqtt_port, protocol, "WRONG")
        try:
            device.wait(lambda d=device: d.connack is not None)  # type: ignore[misc]
            assert device.connack == code
        finally:
            device.close()


def test_metrics_count_the_mqtt_device(running: GatewayProcess) -> None:
    import httpx

    device = PahoDevice(running.mqtt_port, paho.MQTTv5, "TOKEN_1")
    try:
        device.wait(lambda: device.connack == 0)
        text = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics").text
        assert 'tb_gateway_devices_connected{transport="mqtt"} 1.0' in text
    finally:
        device.close()


@pytest.mark.skipif(not SDK_PYTHON.exists(), reason="tb-mqtt-client venv absent: run scripts/tb-sdk-venv.sh")
def test_thingsboard_sdk(running: GatewayProcess) -> None:
    def sdk(token: str) -> dict[str, Any]:
        result = subprocess.run(
            [str(SDK_PYTHON), str(ROOT / "tests" / "mqtt_sdk_client.py"), "127.0.0.1", str(running.mqtt_port), token],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        return dict(orjson.loads(result.stdout.strip().splitlines()[-1]))

    seen = sdk("TOKEN_1")
    assert seen["connack"] == 0
    assert seen["limits_applied"] is True  # getSessionLimits answered and applied
    assert seen["max_payload_size"] == int(65536 * 0.8)
    assert (seen["telemetry_rc"], seen["attributes_rc"]) == (0, 0)
    assert seen["attributes"] == {"client": {"sdk_fw": "v-sdk"}}
    # forwarded to the backend: on the embedded default nobody answers within the SDK's 10 s (docs/downlink.md)
    assert "rpc" not in seen
    assert seen["connected_at_end"] is True
    records = stored(running)
    assert [(r["device"], r["kind"], r["values"]) for r in records] == [
        ("meter-1", "telemetry", {"sdk_temp": 22.5, "sdk_on": True}),
        ("meter-1", "attributes", {"sdk_fw": "v-sdk"}),
    ]
    assert sdk("WRONG")["connack"] == 0x86  # MQTT 5: bad user name or password
    assert sys.executable != str(SDK_PYTHON)
