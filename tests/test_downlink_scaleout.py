"""Server-side RPC across processes, end to end: real `tb-gateway run` (WORKERS=2, or two instances), real
Kafka and Redis, paho-mqtt 5 devices. The RPC topic has one partition, so one process reads every request
and the router (downlink/router.py) must carry it to whichever process holds the device."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest

from tb_gateway.admin import admin_ports
from tests.conftest import GatewayFactory
from tests.gateway_process import GatewayProcess
from tests.harness.kafka import KafkaBroker
from tests.harness.redis import RedisServer
from tests.test_downlink_http import Background, curl
from tests.test_downlink_kafka import device_id, produce, read_until, topics
from tests.test_downlink_mqtt import Device

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REQUEST_TOPIC = "v1/devices/me/rpc/request/+"


def settings(kafka: KafkaBroker, redis: RedisServer, prefix: str) -> dict[str, str]:
    names = topics(kafka, prefix)
    assert names.server_rpc and names.shared_attributes and names.client_rpc_replies
    return {
        "redis_url": redis.url,
        "kafka_enabled": "true",
        "kafka_bootstrap_servers": kafka.bootstrap,
        "kafka_topic_telemetry": f"{prefix}.telemetry",
        "kafka_topic_device_events": f"{prefix}.device-events",
        "kafka_topic_rpc_requests": f"{prefix}.rpc.requests",
        "kafka_topic_rpc_responses": f"{prefix}.rpc.responses",
        "kafka_topic_server_rpc": names.server_rpc,
        "kafka_topic_shared_attributes": names.shared_attributes,
        "kafka_topic_client_rpc_replies": names.client_rpc_replies,
        "kafka_downlink_group_id": f"gw-{prefix}",
    }


def holders(gw: GatewayProcess, names: list[str]) -> dict[str, int]:
    """Which worker holds each device, from the workers' admin APIs."""
    found: dict[str, int] = {}
    for index, port in enumerate(admin_ports(gw.data_dir, 0, 2)):
        for name in names:
            if httpx.get(f"http://127.0.0.1:{port}/api/devices/{name}", timeout=5).json()["sessions"]:
                found[name] = index
    return found


def answer(device: Device, count: int, reply: dict[str, Any]) -> tuple[str, Any]:
    topic, body = device.next_message(count)
    device.client.publish(topic.replace("/request/", "/response/"), orjson.dumps(reply), qos=1)
    return topic, body


def steps(outcomes: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((o["values"]["requestId"], o["values"]["status"]) for o in outcomes)


def test_workers_rpc_from_kafka_reaches_devices_on_either_worker(
    kafka: KafkaBroker, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    prefix = f"so-{uuid.uuid4().hex[:8]}"
    common = settings(kafka, redis_server, prefix)
    gw = gateway_factory("w", workers="2", **common)
    names = [f"dev-{i}" for i in range(8)]
    for name in names:
        gw.add_device(name, f"TOK-{name}")
    ids = {name: device_id(gw, name) for name in names}
    gw.start()
    devices: dict[str, Device] = {}
    try:
        for name in names:
            devices[name] = Device(gw, paho.MQTTv5, token=f"TOK-{name}")
            devices[name].subscribe(REQUEST_TOPIC)
        held = holders(gw, names)
        for _ in range(20):  # the kernel spreads connections; make sure both workers hold some
            if len(held) == len(names) and len(set(held.values())) == 2:
                break
            name = names[len(devices) % len(names)]
            devices[name].close()
            devices[name] = Device(gw, paho.MQTTv5, token=f"TOK-{name}")
            devices[name].subscribe(REQUEST_TOPIC)
            held = holders(gw, names)
        assert len(set(held.values())) == 2, held

        for name in names:
            produce(kafka.bootstrap, common["kafka_topic_server_rpc"], ids[name], {
                "method": "identify", "params": {"who": name}, "timeout": 10000, "requestId": f"r-{name}",
            })  # fmt: skip
        for name in names:
            topic, body = answer(devices[name], 1, {"me": name})
            assert topic.startswith("v1/devices/me/rpc/request/") and body == {
                "method": "identify",
                "params": {"who": name},
            }
        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 2 * len(names))
        time.sleep(0.5)  # anything extra (a duplicate report) would be there by now
        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 2 * len(names))
        assert steps(outcomes) == Counter(
            {(f"r-{name}", status): 1 for name in names for status in ("delivered", "replied")}
        )
        replies = {o["device"]: o["values"]["response"] for o in outcomes if o["values"]["status"] == "replied"}
        assert replies == {name: {"me": name} for name in names}
        assert all(o["transport"] == "mqtt" for o in outcomes)
    finally:
        for device in devices.values():
            device.close()
    assert gw.stop() == 0
    assert "without REDIS_URL" not in gw.log()


def test_workers_without_redis_say_so_once_at_start_up(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(workers="2").start()
    lines = [line for line in gw.log().splitlines() if "WORKERS=2 without REDIS_URL" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    assert gw.stop() == 0


def consumed(metrics: str) -> bool:
    return any(
        line.startswith("tb_gateway_downlink_consumed_total{")
        and 'result="applied"' in line
        and float(line.split()[-1]) >= 1
        for line in metrics.splitlines()
    )


def share_registry(source: GatewayProcess, target: GatewayProcess) -> None:
    """Both instances know the same devices (as they would from ThingsBoard): copy the SQLite registry."""
    target.data_dir.mkdir(parents=True, exist_ok=True)
    for path in source.data_dir.glob("registry.db*"):
        shutil.copy(path, target.data_dir / path.name)


def test_instances_rpc_follows_a_device_moving_from_a_to_b(
    kafka: KafkaBroker, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    prefix = f"mv-{uuid.uuid4().hex[:8]}"
    common = settings(kafka, redis_server, prefix)
    a = gateway_factory("a", **common)
    b = gateway_factory("b", **common)
    a.add_device("mover", "MOVER_TOKEN")
    share_registry(a, b)
    dev = device_id(a, "mover")
    a.start()
    b.start()
    rpc_topic = common["kafka_topic_server_rpc"]
    on_a = Device(a, paho.MQTTv5, token="MOVER_TOKEN")
    on_a.client.reconnect_delay_set(30, 60)  # paho must not take the session back after the take-over
    gone = threading.Event()
    reasons: list[int] = []
    on_a.client.on_disconnect = lambda client, userdata, flags, reason, props: (
        reasons.append(reason.value),
        gone.set(),
    )
    on_b: Device | None = None
    try:
        on_a.subscribe(REQUEST_TOPIC)
        produce(kafka.bootstrap, rpc_topic, dev, {"method": "first", "timeout": 10000, "requestId": "r-1"})
        assert answer(on_a, 1, {"on": "a"})[1] == {"method": "first", "params": None}
        read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 2)  # the reply reached A before it moves

        on_b = Device(b, paho.MQTTv5, token="MOVER_TOKEN")
        assert gone.wait(5) and reasons == [0x8E]  # Session taken over
        on_a.client.loop_stop()
        on_b.subscribe(REQUEST_TOPIC)
        produce(kafka.bootstrap, rpc_topic, dev, {"method": "second", "timeout": 10000, "requestId": "r-2"})
        assert answer(on_b, 1, {"on": "b"})[1] == {"method": "second", "params": None}

        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 4)
        time.sleep(0.5)
        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 4)
        assert steps(outcomes) == Counter(
            {("r-1", "delivered"): 1, ("r-1", "replied"): 1, ("r-2", "delivered"): 1, ("r-2", "replied"): 1}
        )
        assert {o["values"]["requestId"]: o["values"]["response"] for o in outcomes if o["values"]["response"]} == {
            "r-1": {"on": "a"},
            "r-2": {"on": "b"},
        }
    finally:
        on_a.client.loop_stop()
        if on_b is not None:
            on_b.close()


def test_rpc_for_a_device_that_connects_later_to_the_other_instance_is_delivered_once(
    kafka: KafkaBroker, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    prefix = f"lt-{uuid.uuid4().hex[:8]}"
    common = settings(kafka, redis_server, prefix)
    a = gateway_factory("a", **common)  # reads the RPC topic
    b = gateway_factory("b", **common, kafka_downlink_enabled="false")  # reads nothing: A must route to it
    a.add_device("sleepy", "SLEEPY_TOKEN")
    share_registry(a, b)
    dev = device_id(a, "sleepy")
    a.start()
    b.start()
    produce(kafka.bootstrap, common["kafka_topic_server_rpc"], dev, {
        "method": "wake", "params": {"n": 1}, "timeout": 12000, "requestId": "late-1",
    })  # fmt: skip
    metrics = f"http://127.0.0.1:{a.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while not consumed(httpx.get(metrics, timeout=5).text):  # A has read it, while nobody holds the device
        assert time.monotonic() < deadline, "A never read the RPC"
        time.sleep(0.1)
    time.sleep(0.5)

    device = Device(b, paho.MQTTv5, token="SLEEPY_TOKEN")
    try:
        device.subscribe(REQUEST_TOPIC)
        assert answer(device, 1, {"awake": True}) == (
            "v1/devices/me/rpc/request/1",
            {"method": "wake", "params": {"n": 1}},
        )
        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 2)
        time.sleep(1.0)  # a second delivery, or a report from A, would show up here
        assert len(device.messages) == 1
        outcomes = read_until(kafka.bootstrap, common["kafka_topic_rpc_responses"], 2)
        assert steps(outcomes) == Counter({("late-1", "delivered"): 1, ("late-1", "replied"): 1})

        # client-side RPC from the device on B: the reply is read by A (B reads no downlink) and sent on to B
        device.subscribe("v1/devices/me/rpc/response/+")
        device.client.publish("v1/devices/me/rpc/request/7", '{"method":"getTime","params":{}}', qos=1)
        [asked] = read_until(kafka.bootstrap, common["kafka_topic_rpc_requests"], 1)
        reply = {"id": asked["values"]["id"], "response": {"time": 42}}
        produce(kafka.bootstrap, common["kafka_topic_client_rpc_replies"], dev, reply)
        assert device.next_message(2) == ("v1/devices/me/rpc/response/7", {"time": 42})
        assert 'result="forwarded"' in httpx.get(metrics, timeout=5).text
    finally:
        device.close()


def test_cli_shared_attribute_change_reaches_the_other_instance(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    a = gateway_factory("a", redis_url=redis_server.url)  # the embedded default: no Kafka, the CLI is the source
    b = gateway_factory("b", redis_url=redis_server.url)
    a.add_device("thermo", "THERMO_TOKEN")
    share_registry(a, b)
    a.start()
    b.start()
    with httpx.Client(timeout=10) as client:
        poll = Background(curl, f"{b.base_url}/api/v1/THERMO_TOKEN/attributes/updates?timeout=10000")
        time.sleep(0.3)  # the long poll is registered on B
        a.cli("attributes", "set", "thermo", "target=21.5")
        assert poll.outcome() == (200, '{"target":21.5}')  # pushed on B, once
        assert client.get(f"{b.base_url}/api/v1/THERMO_TOKEN/attributes").json() == {"shared": {"target": 21.5}}
        assert client.get(f"{a.base_url}/api/v1/THERMO_TOKEN/attributes").json() == {"shared": {"target": 21.5}}
