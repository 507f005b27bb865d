"""ThingsBoard's own SDK (`tb-mqtt-client`) driven from Kafka: server-side RPC, shared attributes, client RPC.

The CLI-driven twin is tests/test_downlink_mqtt.py::test_thingsboard_sdk_downlink; here every downlink comes
from the backend's topics and every outcome goes back to Kafka, as a real deployment runs.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.harness.kafka import KafkaBroker
from tests.test_downlink_kafka import device_id, produce, read_until, topics
from tests.test_downlink_mqtt import ROOT, SDK_PYTHON, TOKEN

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.skipif(not SDK_PYTHON.exists(), reason="run `make deps` (scripts/tb-sdk-venv.sh) first")
def test_thingsboard_sdk_downlink_from_kafka(kafka: KafkaBroker, gateway_factory: GatewayFactory) -> None:
    prefix = f"sdk-{uuid.uuid4().hex[:8]}"
    names = topics(kafka, prefix)
    gateway = gateway_factory(
        kafka_enabled="true",
        kafka_bootstrap_servers=kafka.bootstrap,
        kafka_topic_telemetry=f"{prefix}.telemetry",
        kafka_topic_attributes=f"{prefix}.attributes",
        kafka_topic_device_events=f"{prefix}.device-events",
        kafka_topic_rpc_requests=f"{prefix}.rpc.requests",
        kafka_topic_rpc_responses=f"{prefix}.rpc.responses",
        kafka_topic_server_rpc=names.server_rpc,
        kafka_topic_shared_attributes=names.shared_attributes,
        kafka_topic_client_rpc_replies=names.client_rpc_replies,
        kafka_downlink_group_id=f"gw-{prefix}",
    )
    gateway.add_device("valve-5", TOKEN)
    dev = device_id(gateway, "valve-5")
    produce(kafka.bootstrap, names.shared_attributes, dev, {"values": {"target": 21.5}})
    gateway.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{gateway.base_url}/api/v1/{TOKEN}/attributes").json() != {"shared": {"target": 21.5}}:
        assert time.monotonic() < deadline, "the shared attributes from Kafka never arrived"
        time.sleep(0.1)
    sdk = subprocess.Popen(
        [
            str(SDK_PYTHON),
            str(ROOT / "tests" / "mqtt_sdk_downlink.py"),
            "127.0.0.1",
            str(gateway.mqtt_port),
            TOKEN,
            "1",
            "1",
        ],
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
                if not line or orjson.loads(line)["event"] == "error":
                    sdk.kill()
                    _, err = sdk.communicate()
                    raise AssertionError(f"the SDK ended before {name}: {events} {line}\n{err[-3000:]}")
                events.append(orjson.loads(line))
                if events[-1]["event"] == name:
                    return events[-1]

        next_event("connected")
        # the SDK's attribute request is answered from the shared attributes the backend published
        assert next_event("shared")["content"] == {"shared": {"target": 21.5}}
        # its client-side RPC reaches the backend's topic; the backend answers through Kafka
        [asked] = read_until(kafka.bootstrap, f"{prefix}.rpc.requests", 1)
        assert (asked["device"], asked["values"]["method"], asked["values"]["params"]) == (
            "valve-5",
            "getTime",
            {"tz": "UTC"},
        )
        produce(kafka.bootstrap, names.client_rpc_replies, dev, {"id": asked["values"]["id"], "response": {"t": 7}})
        # a server-side RPC from Kafka reaches the SDK's handler; its reply lands on the responses topic
        request = {"method": "setTarget", "params": {"target": 23}, "timeout": 30000, "requestId": "ops-7"}
        produce(kafka.bootstrap, names.server_rpc, dev, request)
        assert next_event("rpc")["body"] == {"method": "setTarget", "params": {"target": 23}}
        # a shared-attribute change from Kafka is pushed to the SDK's subscription
        produce(kafka.bootstrap, names.shared_attributes, dev, {"values": {"target": 23}})
        assert next_event("attributes")["content"] == {"target": 23}
        assert next_event("done")["seen"] == {"rpc": 1, "attributes": 1, "client_rpc": 1}
    finally:
        sdk.kill()
        sdk.communicate()
    client_rpc = next(e for e in events if e["event"] == "client_rpc")
    assert client_rpc["content"] == {"t": 7}
    outcomes = read_until(kafka.bootstrap, f"{prefix}.rpc.responses", 2)
    assert [(o["values"]["requestId"], o["values"]["status"]) for o in outcomes] == [
        ("ops-7", "delivered"),
        ("ops-7", "replied"),
    ]
    assert outcomes[1]["values"]["response"] == {"echo": {"target": 23}, "method": "setTarget"}
