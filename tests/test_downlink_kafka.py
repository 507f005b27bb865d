"""The Kafka downlink source against the real broker: server-side RPC, shared attributes, client-RPC replies."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import KafkaException, Producer

from tb_gateway.downlink.kafka_source import DownlinkTopics, KafkaDownlinkSource
from tb_gateway.downlink.sessions import Feature
from tb_gateway.records import RecordKind, Transport
from tb_gateway.sinks import kafka_records
from tests.conftest import GatewayFactory
from tests.downlink_support import DEVICE, OTHER, Clock, FakePipeline, FakeSession, make_hub
from tests.harness.kafka import KafkaBroker, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def topics(kafka: KafkaBroker, prefix: str) -> DownlinkTopics:
    names = DownlinkTopics(f"{prefix}.rpc.server", f"{prefix}.attributes.shared", f"{prefix}.rpc.client-replies")
    kafka.create_topic(names.server_rpc)
    kafka.create_topic(names.shared_attributes, config={"cleanup.policy": "compact"})
    kafka.create_topic(names.client_rpc_replies)
    return names


def produce(bootstrap: str, topic: str, key: str, value: Any) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    encoded = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    producer.produce(topic, encoded, key.encode())
    assert producer.flush(10) == 0


def test_kafka_source_applies_each_topic_and_skips_bad_records(kafka: KafkaBroker, tmp_path: Path) -> None:
    names = topics(kafka, f"src-{uuid.uuid4().hex[:8]}")

    async def scenario() -> None:
        pipeline = FakePipeline()
        hub, store = make_hub(tmp_path, Clock(), pipeline)
        source = KafkaDownlinkSource(
            hub, hub._metrics, bootstrap_servers=[kafka.bootstrap], group_id=f"g-{uuid.uuid4().hex}", topics=names
        )
        attributes, rpc = FakeSession(), FakeSession(device=OTHER)
        hub.subscribe(attributes, Feature.ATTRIBUTES)
        hub.subscribe(rpc, Feature.RPC)
        waiting = hub.client_rpc(DEVICE, Transport.MQTT, "getWeather", {"city": "Riga"})
        [request] = pipeline.of(RecordKind.RPC_REQUEST)

        loop = asyncio.get_running_loop()
        send = lambda topic, key, value: loop.run_in_executor(None, produce, kafka.bootstrap, topic, key, value)  # noqa: E731
        await send(names.shared_attributes, DEVICE.id, b"{not json")
        await send(names.shared_attributes, DEVICE.id, {"values": {"mode": "eco", "target": 21}})
        await send(names.shared_attributes, DEVICE.id, {"update": [1]})
        await send(names.shared_attributes, DEVICE.id, {"update": {"target": 22}, "delete": ["mode"]})
        await send(names.server_rpc, OTHER.id, {"method": 7})
        await send(names.server_rpc, OTHER.id, {"method": "setGpio", "params": {"pin": 4}, "requestId": 99})
        await send(names.server_rpc, "", {"method": "m"})  # no device at all
        await send(names.client_rpc_replies, DEVICE.id, {"id": "w0-999", "response": 1})  # nobody waits
        await send(names.client_rpc_replies, DEVICE.id, {"id": "w7-1", "response": 1})  # another process's
        await send(names.client_rpc_replies, DEVICE.id, {"id": request["id"], "response": {"sky": "clear"}})

        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(source.run())
            reply = await asyncio.wait_for(waiting, 30)
            deadline = loop.time() + 30
            while len(attributes.attributes) < 2 or not rpc.rpcs:
                assert loop.time() < deadline, (attributes.attributes, rpc.rpcs)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # everything produced is read by now
            source.close()
            await asyncio.wait_for(runner, 10)

        assert reply == {"sky": "clear"}
        assert attributes.attributes == [{"mode": "eco", "target": 21}, {"target": 22, "deleted": ["mode"]}]
        assert store.get(DEVICE.id, "shared") == {"target": 22}
        assert [(c.method, c.params) for c in rpc.rpcs] == [("setGpio", {"pin": 4})]
        hub.rpc_replied(OTHER.id, rpc.rpcs[0].id, b'{"ok":true}')
        [delivered, replied] = pipeline.of(RecordKind.RPC_RESPONSE)
        assert delivered["status"] == "delivered"
        assert replied["requestId"] == "99" and replied["status"] == "replied" and replied["response"] == {"ok": True}
        metrics = hub._metrics.render().decode()
        for topic, result, count in [
            (names.shared_attributes, "invalid", 2),
            (names.shared_attributes, "applied", 2),
            (names.server_rpc, "invalid", 2),
            (names.server_rpc, "applied", 1),
            (names.client_rpc_replies, "unmatched", 1),
            (names.client_rpc_replies, "other_worker", 1),
            (names.client_rpc_replies, "applied", 1),
        ]:
            line = f'tb_gateway_downlink_consumed_total{{result="{result}",topic="{topic}"}} {count}.0'
            assert line in metrics, line

    asyncio.run(scenario())


def test_with_workers_rpc_is_read_once_and_the_rest_by_every_worker(tmp_path: Path) -> None:
    from tb_gateway.config import Settings

    async def scenario() -> list[tuple[str, list[str]]]:
        hub, _ = make_hub(tmp_path, Clock(), FakePipeline())
        split = []
        for index in (None, 3):
            settings = Settings(worker_index=index, kafka_downlink_group_id="g", kafka_bootstrap_servers="127.0.0.1:1")
            split.append(
                [
                    (s._group, sorted(s._handlers))
                    for s in KafkaDownlinkSource.from_settings(settings, hub, hub._metrics)
                ]
            )
        return split

    single, worker = asyncio.run(scenario())
    assert single == [("g", ["tb.attributes.shared", "tb.rpc.client-replies", "tb.rpc.server"])]
    assert worker == [("g", ["tb.rpc.server"]), ("g-worker-3", ["tb.attributes.shared", "tb.rpc.client-replies"])]


def device_id(gateway: Any, name: str) -> str:
    rows = [orjson.loads(line) for line in gateway.cli("device", "list", "--json").stdout.splitlines()]
    return str(next(row["id"] for row in rows if row["name"] == name))


def test_gateway_takes_downlink_from_kafka_and_reports_outcomes(
    kafka: KafkaBroker, gateway_factory: GatewayFactory
) -> None:
    prefix = f"dl-{uuid.uuid4().hex[:8]}"
    names = topics(kafka, prefix)
    gateway = gateway_factory(
        kafka_enabled="true",
        kafka_bootstrap_servers=kafka.bootstrap,
        kafka_topic_telemetry=f"{prefix}.telemetry",
        kafka_topic_device_events=f"{prefix}.device-events",
        kafka_topic_rpc_responses=f"{prefix}.rpc.responses",
        kafka_topic_server_rpc=names.server_rpc,
        kafka_topic_shared_attributes=names.shared_attributes,
        kafka_topic_client_rpc_replies=names.client_rpc_replies,
        kafka_downlink_group_id=f"gw-{prefix}",
    )
    gateway.add_device("boiler-17", "TOKEN")
    dev = device_id(gateway, "boiler-17")
    produce(kafka.bootstrap, names.shared_attributes, dev, {"values": {"target": 21.5}})  # before start-up
    gateway.start()
    produce(kafka.bootstrap, names.server_rpc, dev, {"method": "reboot", "timeout": 300, "requestId": "ops-1"})
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        deadline = time.monotonic() + 30
        while client.get("/api/v1/TOKEN/attributes").json() != {"shared": {"target": 21.5}}:
            assert time.monotonic() < deadline, "shared attributes never arrived"
            time.sleep(0.1)
        assert client.post("/api/v1/TOKEN/telemetry", json={"t": 1}).status_code == 200

    [outcome] = read_until(kafka.bootstrap, f"{prefix}.rpc.responses", 1)
    assert outcome["device_id"] == dev and outcome["kind"] == "rpc_response"
    assert outcome["values"] == {
        "id": 1,
        "requestId": "ops-1",
        "method": "reboot",
        "oneway": False,
        "status": "expired",
        "response": None,
    }
    assert outcome["transport"] == "gateway"
    events = read_until(kafka.bootstrap, f"{prefix}.device-events", 1)
    assert [(e["kind"], e["values"]["event"], e["transport"]) for e in events] == [("device_state", "activity", "http")]


def read_until(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Checked records of ``topic`` once it holds at least ``count``."""
    deadline = time.monotonic() + timeout_s
    found: list[dict[str, Any]] = []
    while len(found) < count:
        assert time.monotonic() < deadline, [(r["kind"], r["device"], r["values"]) for r in found]
        with contextlib.suppress(RuntimeError, KafkaException):  # not created yet, or its leader not elected yet
            found = [kafka_records.check(m["key"], m["value"], m["headers"]) for m in read_topic(bootstrap, topic, 5)]
        time.sleep(0.2)
    return found


def test_rpc_from_kafka_reaches_mqtt_http_and_coap_clients(kafka: KafkaBroker, gateway_factory: GatewayFactory) -> None:
    import paho.mqtt.client as paho

    from tests.test_downlink_coap import read_until as read_lines
    from tests.test_downlink_http import Background, curl
    from tests.test_downlink_mqtt import Device

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    names = topics(kafka, prefix)
    gateway = gateway_factory(
        kafka_enabled="true",
        kafka_bootstrap_servers=kafka.bootstrap,
        kafka_topic_telemetry=f"{prefix}.telemetry",
        kafka_topic_device_events=f"{prefix}.device-events",
        kafka_topic_rpc_requests=f"{prefix}.rpc.requests",
        kafka_topic_rpc_responses=f"{prefix}.rpc.responses",
        kafka_topic_server_rpc=names.server_rpc,
        kafka_topic_shared_attributes=names.shared_attributes,
        kafka_topic_client_rpc_replies=names.client_rpc_replies,
        kafka_downlink_group_id=f"gw-{prefix}",
    )
    gateway.add_device("valve-5", "MQTT_DL_TOKEN")  # the token tests.test_downlink_mqtt.Device uses
    gateway.add_device("meter-9", "HTTP_TOKEN")
    gateway.add_device("thermostat-1", "COAP_TOKEN")
    ids = {name: device_id(gateway, name) for name in ("valve-5", "meter-9", "thermostat-1")}
    gateway.start()

    mqtt = Device(gateway, paho.MQTTv5)
    poll = Background(curl, f"{gateway.base_url}/api/v1/HTTP_TOKEN/rpc?timeout=30000")
    coap_rpc = f"coap://127.0.0.1:{gateway.coap_port}/api/v1/COAP_TOKEN/rpc"
    observer = subprocess.Popen(
        ["coap-client-notls", "-w", "-s", "40", "-B", "40", "-m", "get", coap_rpc],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        mqtt.subscribe("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/response/+")
        time.sleep(0.5)  # the long poll and the observation are registered
        for name in ids:
            request = {"method": "identify", "params": {"who": name}, "timeout": 30000, "requestId": f"r-{name}"}
            produce(kafka.bootstrap, names.server_rpc, ids[name], request)

        assert mqtt.next_message(1) == (
            "v1/devices/me/rpc/request/1",
            {"method": "identify", "params": {"who": "valve-5"}},
        )
        mqtt.client.publish("v1/devices/me/rpc/response/1", '{"me":"mqtt"}', qos=1)
        assert poll.outcome() == (200, '{"id":1,"method":"identify","params":{"who":"meter-9"}}')
        assert curl("-X", "POST", "-d", '{"me":"http"}', f"{gateway.base_url}/api/v1/HTTP_TOKEN/rpc/1") == (200, "")
        read_lines(observer, '"method":"identify"')
        reply = ["coap-client-notls", "-B", "10", "-m", "post", "-e", '{"me":"coap"}', f"{coap_rpc}/1"]
        subprocess.run(reply, capture_output=True, timeout=30, check=True)

        outcomes = read_until(kafka.bootstrap, f"{prefix}.rpc.responses", 6)
        replied = {
            o["values"]["requestId"]: (o["device"], o["transport"], o["values"]["response"])
            for o in outcomes
            if o["values"]["status"] == "replied"
        }
        assert replied == {
            "r-valve-5": ("valve-5", "mqtt", {"me": "mqtt"}),
            "r-meter-9": ("meter-9", "http", {"me": "http"}),
            "r-thermostat-1": ("thermostat-1", "coap", {"me": "coap"}),
        }
        assert sorted(o["values"]["status"] for o in outcomes) == ["delivered"] * 3 + ["replied"] * 3

        # client-side RPC: the device asks, the backend reads the request from Kafka and answers through Kafka
        mqtt.client.publish("v1/devices/me/rpc/request/5", '{"method":"getTime","params":{"tz":"UTC"}}', qos=1)
        [asked] = read_until(kafka.bootstrap, f"{prefix}.rpc.requests", 1)
        assert (asked["device"], asked["values"]["method"], asked["values"]["params"]) == (
            "valve-5",
            "getTime",
            {"tz": "UTC"},
        )
        produce(
            kafka.bootstrap,
            names.client_rpc_replies,
            ids["valve-5"],
            {"id": asked["values"]["id"], "response": {"time": 42}},
        )
        assert mqtt.next_message(2) == ("v1/devices/me/rpc/response/5", {"time": 42})
    finally:
        mqtt.close()
        observer.kill()
        observer.communicate()
