"""End to end over MQTT (real `tb-gateway run`, a raw client speaking exact packets): rate limits visible as
PUBACK / DISCONNECT 0x96 (3.1.1: close) and in getSessionLimits, a blocked address refused at CONNECT, and a
device revoked or moving to another instance losing its old connection (two instances, Kafka and Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import uuid4

import orjson
import pytest

from tb_gateway.mqtt.packets import ConnAck, Disconnect, PingReq, PingResp, PubAck, Publish
from tests.conftest import GatewayFactory
from tests.harness.kafka import KafkaBroker
from tests.harness.redis import RedisServer
from tests.mqtt_support import Client

pytestmark = pytest.mark.slow

TOKEN = "MQTT_LIMITED_TOKEN"
TELEMETRY = "v1/devices/me/telemetry"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def publish_qos1(client: Client, packet_id: int, payload: bytes = b'{"t":1}') -> None:
    await client.send(Publish(TELEMETRY, payload, qos=1, packet_id=packet_id))


def test_mqtt5_rate_limit_puback_0x96_then_disconnect_for_qos0(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(rate_limit_enabled="true", rate_limit_device_messages="2:60").start()
    gw.add_device("limited", TOKEN)

    async def scenario() -> None:
        client = await Client.connected(gw.mqtt_port, 5, TOKEN)
        request = orjson.dumps({"method": "getSessionLimits", "params": {}})
        await client.send(Publish("v1/devices/me/rpc/request/7", request, qos=0))
        answer = await client.recv()
        assert isinstance(answer, Publish) and answer.topic == "v1/devices/me/rpc/response/7"
        limits = orjson.loads(answer.payload)["rateLimits"]
        assert limits == {"messages": "2:60", "telemetryMessages": None, "telemetryDataPoints": None}
        for packet_id in (1, 2, 3, 4):
            await publish_qos1(client, packet_id)
        acks = await client.recv_n(4)
        assert [(a.packet_id, a.reason_code) for a in acks if isinstance(a, PubAck)] == [
            (1, 0x00),
            (2, 0x00),
            (3, 0x96),  # Message rate too high: the device sees it, and stays connected
            (4, 0x96),
        ]
        await client.send(PingReq())
        assert isinstance(await client.recv(), PingResp)
        await client.send(Publish(TELEMETRY, b'{"t":2}', qos=0))  # QoS 0: no PUBACK to carry it
        assert await client.until_closed() == [Disconnect(0x96)]

    run(scenario)
    telemetry = [line for line in gw.cli("messages", "--json").stdout.splitlines() if '"telemetry"' in line]
    assert len(telemetry) == 2
    assert gw.log().count("refused a message from device limited over mqtt: rate_limited") == 1


def test_mqtt311_rate_limit_closes_the_connection(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(rate_limit_enabled="true", rate_limit_device_telemetry_data_points="3:60").start()
    gw.add_device("limited", TOKEN)

    async def scenario() -> None:
        client = await Client.connected(gw.mqtt_port, 4, TOKEN)
        await publish_qos1(client, 1, b'{"a":1,"b":2}')
        await publish_qos1(client, 2, b'{"c":3,"d":4}')  # 4 data points > 3 per minute
        packets = await client.until_closed()
        assert packets == [PubAck(1)]  # the earlier answer first, then the close; a 3.1.1 PUBACK has no code

    run(scenario)


def test_blocked_address_is_refused_at_connect(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(ip_block_enabled="true", ip_block_max_wrong_credentials="3").start()
    gw.add_device("good", TOKEN)

    async def scenario() -> None:
        for version in (5, 4, 5):
            client = await Client.open(gw.mqtt_port, version)
            assert (await client.connect(username="GUESS", client_id="c", password=b"pw")).reason_code in (0x86, 0x05)
            await client.close()
        for version, code in ((5, 0x9F), (4, 0x03)):  # Connection rate exceeded / Server unavailable
            client = await Client.open(gw.mqtt_port, version)
            ack = await client.connect(username=TOKEN)
            assert ack == ConnAck(code)
            assert await client.until_closed() == []

    run(scenario)
    assert "address 127.0.0.1 blocked for 60 s after 3 wrong credentials" in gw.log()


def test_a_device_moving_between_instances_takes_its_session_and_removal_closes_it(
    gateway_factory: GatewayFactory, redis_server: RedisServer, kafka: KafkaBroker
) -> None:
    prefix = f"tb{uuid4().hex[:8]}"
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "kafka_enabled": "true",
        "kafka_bootstrap_servers": kafka.bootstrap,
        "kafka_topic_telemetry": f"{prefix}.telemetry",
        "kafka_topic_attributes": f"{prefix}.attributes",
        "kafka_topic_device_events": f"{prefix}.device-events",
    }
    a = gateway_factory("a", **shared).start()
    b = gateway_factory("b", **shared).start()
    a.add_device("mover", TOKEN)
    time.sleep(1.2)  # A's registry poll

    async def scenario() -> None:
        on_a = await Client.connected(a.mqtt_port, 5, TOKEN)
        await publish_qos1(on_a, 1)
        assert await on_a.recv() == PubAck(1)
        on_b = await Client.connected(b.mqtt_port, 5, TOKEN)  # B knows the token through Redis
        start = time.monotonic()
        assert await on_a.until_closed() == [Disconnect(0x8E)]  # Session taken over
        assert time.monotonic() - start < 1.0
        await publish_qos1(on_b, 2)
        assert await on_b.recv() == PubAck(2)  # the session lives on B
        assert await on_b.silent(0.5)
        removed = await asyncio.to_thread(a.cli, "device", "remove", "mover")
        assert "revoked on 2 gateway instance(s)" in removed.stdout
        assert await on_b.until_closed() == [Disconnect(0x98)]  # Administrative action: the device is gone
        again = await Client.open(b.mqtt_port, 5)
        assert (await again.connect(username=TOKEN)).reason_code == 0x86
        await again.close()

    run(scenario)
    assert "taken_over" in a.log()
