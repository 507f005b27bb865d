"""The asyncio MQTT adapter in process: real sockets on 127.0.0.1, a raw client and paho, a MemorySink."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import trustme
import uvloop
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tb_gateway.mqtt.codec import encode
from tb_gateway.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
)
from tb_gateway.mqtt.server import LATENCY_SAMPLE, MqttConnection
from tb_gateway.records import RecordKind
from tb_gateway.sinks.base import Outcome
from tests.mqtt_support import Client, Env, mqtt_gateway
from tests.support import MemorySink, PollOnlySink

TELEMETRY = "v1/devices/me/telemetry"


def run(tmp_path: Path, scenario: Callable[[Env], Awaitable[None]], sink: MemorySink | None = None, **kw: Any) -> None:
    async def main() -> None:
        async with mqtt_gateway(tmp_path, sink, **kw) as env:
            await scenario(env)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the gateway's own loop
        runner.run(main())


@pytest.mark.parametrize("version", [3, 4, 5])
def test_puback_only_after_the_sink_confirmed(tmp_path: Path, version: int) -> None:
    sink = MemorySink()

    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, version)
        sink.gate.clear()
        await client.send(Publish(TELEMETRY, b'{"temperature":21.5}', 1, 7))
        assert await client.silent(0.3)  # the sink has not confirmed: no PUBACK
        assert sink.records == []
        sink.gate.set()
        assert await client.recv() == PubAck(7)
        [record] = sink.records
        assert (record.device.name, record.kind, record.values) == ("dev1", RecordKind.TELEMETRY, {"temperature": 21.5})
        assert env.sample("tb_gateway_devices_connected", transport="mqtt") == 1
        assert env.sample("tb_gateway_connections_total", transport="mqtt") == 1
        await client.close()

    run(tmp_path, scenario, sink)


@pytest.mark.parametrize("version", [4, 5])
def test_ack_latency_is_observed_for_one_puback_in_eight(tmp_path: Path, version: int) -> None:
    """docs/metrics.md: MQTT samples its ack latency (the messages themselves are counted in full)."""

    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, version)
        for packet_id in range(1, 25):
            await client.send(Publish(TELEMETRY, b'{"n":1}', 1, packet_id))
            assert await client.recv() == PubAck(packet_id)
        assert env.sample("tb_gateway_ack_latency_seconds_count", transport="mqtt") == 24 // LATENCY_SAMPLE
        assert env.sample("tb_gateway_messages_sent_total", transport="mqtt") == 24
        await client.close()

    run(tmp_path, scenario)


def test_one_settle_callback_per_watched_ack_under_a_steady_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device sending one PUBLISH at a time while earlier ones settle: each PUBACK run costs one callback.
    (A callback that was not the watched head's used to re-watch the head, and callbacks multiplied: 3.3
    per message at 55k msg/s, more CPU than the messages.)"""
    calls = 0
    settled = MqttConnection._settled

    def counting(self: MqttConnection, future: Any) -> None:
        nonlocal calls
        calls += 1
        settled(self, future)

    monkeypatch.setattr(MqttConnection, "_settled", counting)
    sink = MemorySink(max_in_flight=3, delay_s=0.003)
    count, devices = 400, 2

    async def device(port: int, token: str) -> None:
        client = await Client.connected(port, 5, username=token)
        for packet_id in range(1, count + 1):
            await client.send(Publish(TELEMETRY, b'{"n":%d}' % packet_id, 1, packet_id))
            await asyncio.sleep(0.0002)
        assert await client.recv_n(count) == [PubAck(i) for i in range(1, count + 1)]
        await client.close()

    async def scenario(env: Env) -> None:
        await asyncio.gather(*(device(env.port, token) for token in ("T1", "T2")))

    run(tmp_path, scenario, sink)
    assert len(sink.records) == count * devices
    # per connection, each watched head belongs to a later batch than the last: one callback per batch at most
    assert calls <= devices * len(sink.batches), (calls, len(sink.batches))


def test_a_durable_batch_is_acknowledged_at_the_next_read_of_any_connection(tmp_path: Path) -> None:
    """Each read polls the pipeline: a PUBACK does not wait for the loop's pass over the sockets to end."""
    sink = PollOnlySink()

    async def scenario(env: Env) -> None:
        first = await Client.connected(env.port, 5, username="T1")
        second = await Client.connected(env.port, 5, username="T2")
        await first.send(Publish(TELEMETRY, b'{"n":1}', 1, 1))
        assert await first.silent(0.2)  # durable (per this sink) but nobody polled yet
        assert len(sink.batches) == 1
        await second.send(PingReq())
        assert await second.recv() == PingResp()
        assert await first.recv() == PubAck(1)
        await first.close()
        await second.close()

    run(tmp_path, scenario, sink)


def test_pubacks_keep_arrival_order_across_batches(tmp_path: Path) -> None:
    sink = MemorySink(max_in_flight=4, delay_s=0.002)

    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        ids = list(range(1, 101))
        await client.send(*(Publish("v2/t", b'{"n":%d}' % i, 1, i) for i in ids))
        acks = await client.recv_n(100)
        assert acks == [PubAck(i) for i in ids]
        assert [r.values["n"] for r in sink.records] == ids
        await client.close()

    run(tmp_path, scenario, sink, mqtt_max_inflight=100)


@pytest.mark.parametrize(
    ("connect", "v3", "v5"),
    [
        ({"username": "nope"}, 0x05, 0x86),
        ({"username": "nope", "password": b"x"}, 0x05, 0x86),
        ({"username": None, "client_id": "unknown"}, 0x02, 0x85),
        ({"username": None}, 0x05, 0x87),
        ({"username": "u1", "client_id": "c1", "password": b"wrong"}, 0x05, 0x86),
    ],
)
def test_refused_credentials_get_the_thingsboard_code(
    tmp_path: Path, connect: dict[str, Any], v3: int, v5: int
) -> None:
    async def scenario(env: Env) -> None:
        for version, code in ((3, v3), (4, v3), (5, v5)):
            client = await Client.open(env.port, version)
            assert await client.connect(**connect) == ConnAck(code)
            assert await client.until_closed() == []
        assert env.sample("tb_gateway_auth_failures_total", transport="mqtt") >= 3
        assert env.sample("tb_gateway_devices_connected", transport="mqtt") == 0

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    "connect",
    [
        {"username": "T1", "password": b"ignored", "client_id": "anything"},
        {"username": "T1", "client_id": "anything"},
        {"username": "u1", "client_id": "c1", "password": b"p1"},
    ],
)
def test_token_and_basic_credentials(tmp_path: Path, connect: dict[str, Any]) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.open(env.port, 5)
        assert (await client.connect(**connect)).reason_code == 0
        await client.send(Publish(TELEMETRY, b'{"a":1}', 1, 1))
        assert await client.recv() == PubAck(1)
        assert env.sink.records[0].device.name == ("dev1" if connect["username"] == "T1" else "basic1")
        await client.close()
        assert env.sample("tb_gateway_auth_failures_total", transport="mqtt") == 0

    run(tmp_path, scenario)


def test_max_connections(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        first = await Client.connected(env.port, 4)
        for version, code in ((4, 0x03), (5, 0x97)):
            extra = await Client.open(env.port, version)
            assert await extra.connect(username="T2") == ConnAck(code)
            assert await extra.until_closed() == []
        await first.close()
        await asyncio.sleep(0.1)
        again = await Client.connected(env.port, 5, username="T2")  # the slot is free again
        await again.close()

    run(tmp_path, scenario, mqtt_max_connections=1)


def test_new_connection_takes_over_the_device(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        old5 = await Client.connected(env.port, 5)
        old3 = await Client.connected(env.port, 4)  # takes over from old5
        assert await old5.until_closed() == [Disconnect(0x8E)]
        new = await Client.connected(env.port, 5)
        assert await old3.until_closed() == []  # 3.1.1: just closed
        assert env.sample("tb_gateway_devices_connected", transport="mqtt") == 1
        await new.send(PingReq())
        assert await new.recv() == PingResp()
        await new.close()
        await asyncio.sleep(0.1)
        assert env.sample("tb_gateway_devices_connected", transport="mqtt") == 0

    run(tmp_path, scenario)


def test_keepalive_enforced_at_one_and_a_half_times(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5, keepalive_s=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.8)
        await client.send(PingReq())  # activity pushes the deadline
        assert await client.recv() == PingResp()
        assert await client.until_closed(4.0) == [Disconnect(0x8D)]
        assert 0.8 + 1.4 < loop.time() - started < 0.8 + 4.0

    run(tmp_path, scenario)


def test_keepalive_runs_while_the_client_does_not_read_our_answers(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5, keepalive_s=1)
        (connection,) = env.server.connections
        connection.pause_writing()  # what the transport says when the client leaves our answers unread
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await client.until_closed(4.0) == [Disconnect(0x8D)]
        assert 1.4 < loop.time() - started < 4.0

    run(tmp_path, scenario)


def test_socket_without_connect_is_closed(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.open(env.port)
        assert await client.until_closed(3.0) == []

    run(tmp_path, scenario, mqtt_connect_timeout_seconds=0.3)


def test_invalid_payload_per_version(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        v5 = await Client.connected(env.port, 5)
        await v5.send(Publish(TELEMETRY, b'{"a":1}', 1, 1), Publish(TELEMETRY, b"not json", 1, 2))
        assert await v5.recv_n(2) == [PubAck(1), PubAck(2, 0x99)]
        await v5.send(Publish(TELEMETRY, b'{"b":2}', 1, 3))
        assert await v5.recv() == PubAck(3)  # still connected
        await v5.send(Publish(TELEMETRY, b"[1]", 0))
        assert await v5.until_closed() == [Disconnect(0x99)]  # QoS 0: nothing else can say it
        v3 = await Client.connected(env.port, 4, username="T2")
        await v3.send(
            Publish(TELEMETRY, b'{"a":1}', 1, 1), Publish(TELEMETRY, b"{", 1, 2), Publish(TELEMETRY, b"{}", 1, 3)
        )
        assert await v3.until_closed() == [PubAck(1)]  # earlier PUBACKs first, then the close
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason="bad_payload") == 3
        assert [r.values for r in env.sink.records if r.device.name == "dev2"] == [{"a": 1}]

    run(tmp_path, scenario)


def test_an_rpc_reply_with_a_bad_request_id_is_an_invalid_payload(tmp_path: Path) -> None:
    """As every request id (docs/mqtt.md): not a decimal Java int is refused, never acknowledged as success."""

    async def scenario(env: Env) -> None:
        v5 = await Client.connected(env.port, 5)
        bad = ("v1/devices/me/rpc/response/abc", "v1/devices/me/rpc/response/2147483648", "v2/r/res/-1")
        await v5.send(*(Publish(topic, b"{}", 1, i + 1) for i, topic in enumerate(bad)))
        assert await v5.recv_n(3) == [PubAck(1, 0x99), PubAck(2, 0x99), PubAck(3, 0x99)]
        await v5.close()
        v3 = await Client.connected(env.port, 4, username="T2")
        await v3.send(Publish("v1/devices/me/rpc/response/7", b"{}", 1, 1), Publish(bad[0], b"{}", 1, 2))
        assert await v3.until_closed() == [PubAck(1)]
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason="bad_payload") == 4

    run(tmp_path, scenario)


def test_unknown_topic_per_version(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        for version, code in ((4, 0), (5, 0x90)):
            client = await Client.connected(env.port, version)
            await client.send(Publish("v1/devices/me/nowhere", b"{}", 1, 5), Publish("x" * 2000, b"", 1, 6))
            assert await client.recv_n(2) == [PubAck(5, code), PubAck(6, code)]
            await client.send(PingReq())
            assert await client.recv() == PingResp()
            await client.close()
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason="unknown_topic") == 4
        assert env.sink.records == []

    run(tmp_path, scenario)


def test_oversize_and_malformed_close_with_0x81_in_v5(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        await client.send_raw(b"\x32" + bytes.fromhex("ff7f"))  # 16383 > 1024: refused from the header
        assert await client.until_closed() == [Disconnect(0x81)]
        client = await Client.connected(env.port, 4)
        await client.send_raw(bytes.fromhex("3003 0005 61"))
        assert await client.until_closed() == []

    run(tmp_path, scenario, max_payload_size=1024)


def test_protocol_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    """docs/mqtt.md: every refusal is counted, those that end the connection too."""
    cases = [
        (b"\x32" + bytes.fromhex("ff7f"), 0x81, "too_large"),  # 16383 > 1024, refused from the header
        (bytes.fromhex("3003 0005 61"), 0x81, "malformed"),
        (encode(Publish(TELEMETRY, b"{}", 2, 1), 5), 0x9B, "qos_not_supported"),
        (encode(Publish(TELEMETRY, b"{}", 1, 1, properties={0x23: 1}), 5), 0x94, "protocol_error"),
        (encode(Publish("v1/devices/+", b"{}", 1, 1), 5), 0x82, "protocol_error"),
        (encode(Publish("", b"{}", 1, 1), 5), 0x82, "protocol_error"),
        (encode(Auth(0x18), 5), 0x82, "protocol_error"),
    ]

    async def scenario(env: Env) -> None:
        for data, code, _ in cases:
            client = await Client.connected(env.port, 5)
            await client.send_raw(data)
            assert await client.until_closed() == [Disconnect(code)]
        for reason in {reason for _, _, reason in cases}:
            expected = sum(1 for *_, r in cases if r == reason)
            assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason=reason) == expected, reason
        await asyncio.sleep(0.2)
        client = await Client.connected(env.port, 5)  # a client that leaves is no refusal
        await client.send(Disconnect())
        assert await client.until_closed() == []
        reasons = {reason for _, _, reason in cases}
        assert sum(env.sample("tb_gateway_refusals_total", transport="mqtt", reason=r) for r in reasons) == len(cases)

    run(tmp_path, scenario, max_payload_size=1024)


def test_qos2_refused(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        await client.send(Publish(TELEMETRY, b"{}", 2, 1))
        assert await client.until_closed() == [Disconnect(0x9B)]

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("outcome", "v5"), [(Outcome.SPOOL_FULL, 0x97), (Outcome.QUEUE_FULL, 0x97), (Outcome.REJECTED, 0x80)]
)
def test_sink_refusals(tmp_path: Path, outcome: Outcome, v5: int) -> None:
    sink = MemorySink()
    sink.outcome_for["dev1"] = outcome

    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        await client.send(Publish(TELEMETRY, b'{"a":1}', 1, 1))
        assert await client.recv() == PubAck(1, v5)
        await client.close()
        client = await Client.connected(env.port, 4)
        await client.send(Publish(TELEMETRY, b'{"a":1}', 1, 1))
        assert await client.until_closed() == []
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason=outcome.value) == 2

    run(tmp_path, scenario, sink)


def test_full_queue_stops_reading_instead_of_buffering(tmp_path: Path) -> None:
    sink = MemorySink()

    async def scenario(env: Env) -> None:
        sink.gate.clear()
        client = await Client.connected(env.port, 5)
        await client.send(*(Publish(TELEMETRY, b'{"v":%d}' % i, 1, i) for i in range(1, 31)))  # one read
        for i in range(31, 41):  # then one message per read, as a device sends them
            await client.send(Publish(TELEMETRY, b'{"v":%d}' % i, 1, i))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        [connection] = env.server.connections
        assert connection._transport is not None and not connection._transport.is_reading()
        assert env.api.pipeline.depth <= 20
        sink.gate.set()
        assert await client.recv_n(40) == [PubAck(i) for i in range(1, 41)]  # none refused: reading waited
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason="queue_full") == 0
        assert [r.values["v"] for r in sink.records] == list(range(1, 41))
        await client.close()

    run(tmp_path, scenario, sink, queue_max_records=20, batch_size=5, mqtt_max_inflight=100)


def test_messages_sent_with_the_connect_wait_for_room_instead_of_being_refused(tmp_path: Path) -> None:
    """docs/mqtt.md: a busy gateway slows devices down rather than refusing them, also for what a device
    sends right behind its CONNECT (held until the CONNACK, then admitted as room frees)."""

    async def scenario(env: Env) -> None:
        for version in (4, 5):
            client = await Client.open(env.port, version)
            publishes = [Publish(TELEMETRY, b'{"n":%d}' % i, 1, i) for i in range(1, 51)]
            await client.send(Connect("", version, username="T1"), *publishes)
            ack = await client.recv()
            assert isinstance(ack, ConnAck) and ack.reason_code == 0
            assert await client.recv_n(50) == [PubAck(i) for i in range(1, 51)]
            await client.close()
        assert env.sample("tb_gateway_refusals_total", transport="mqtt", reason="queue_full") == 0
        assert [r.values["n"] for r in env.sink.records] == list(range(1, 51)) * 2

    run(tmp_path, scenario, queue_max_records=20)


def test_inflight_window_pauses_reading(tmp_path: Path) -> None:
    sink = MemorySink()

    async def scenario(env: Env) -> None:
        sink.gate.clear()
        client = await Client.connected(env.port, 5)
        await client.send(*(Publish(TELEMETRY, b'{"v":1}', 1, i) for i in range(1, 5)))
        await asyncio.sleep(0.2)
        [connection] = env.server.connections
        assert connection._transport is not None and not connection._transport.is_reading()
        sink.gate.set()
        assert await client.recv_n(4) == [PubAck(i) for i in range(1, 5)]
        await asyncio.sleep(0.05)
        assert connection._transport.is_reading()
        await client.close()

    run(tmp_path, scenario, sink, mqtt_max_inflight=2)


@pytest.mark.parametrize(
    ("request_topic", "response_topic"),
    [
        ("v1/devices/me/attributes/request/1", "v1/devices/me/attributes/response/1"),
        ("v2/a/req/2", "v2/a/res/2"),
        ("v2/a/req/j/3", "v2/a/res/j/3"),
    ],
)
def test_attribute_request_answered_without_subscription(
    tmp_path: Path, request_topic: str, response_topic: str
) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 4)
        await client.send(Publish("v1/devices/me/attributes", b'{"fw":"v1-beta","n":5}', 1, 1))
        assert await client.recv() == PubAck(1)
        await client.send(Publish(request_topic, b'{"clientKeys":"fw,missing"}', 1, 2))
        got = await client.recv_n(2)
        response = next(p for p in got if isinstance(p, Publish))
        assert PubAck(2) in got
        assert (response.topic, orjson.loads(response.payload), response.qos) == (
            response_topic,
            {"client": {"fw": "v1-beta"}},
            1,
        )
        await client.send(PubAck(response.packet_id))
        await client.close()

    run(tmp_path, scenario)


def test_client_rpc_session_limits_and_other_methods(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        await client.send(Subscribe(1, (("v1/devices/me/rpc/response/+", 0),)))
        assert await client.recv() == SubAck(1, (0,))
        await client.send(Publish("v1/devices/me/rpc/request/1", b'{"method":"getSessionLimits","params":{}}', 0))
        limits = await client.recv()
        assert isinstance(limits, Publish) and limits.topic == "v1/devices/me/rpc/response/1" and limits.qos == 0
        assert orjson.loads(limits.payload) == {
            "maxPayloadSize": 65536,
            "maxInflightMessages": 100,
            "rateLimits": {"messages": None, "telemetryMessages": None, "telemetryDataPoints": None},
        }
        assert env.sample("tb_gateway_client_rpc_total", result="local") == 1  # as over HTTP and CoAP
        await client.send(Publish("v2/r/req/2", b'{"method":"reboot"}', 1, 9))
        got = await client.recv_n(2)
        answer = next(p for p in got if isinstance(p, Publish))
        assert answer.topic == "v2/r/res/2" and "error" in orjson.loads(answer.payload)
        assert PubAck(9) in got
        await client.close()

    run(tmp_path, scenario)


def test_claim_and_attributes_are_posted(tmp_path: Path) -> None:
    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 4)
        await client.send(Publish("v1/devices/me/claim", b"", 1, 1), Publish("v2/a/j", b'{"x":true}', 1, 2))
        assert await client.recv_n(2) == [PubAck(1), PubAck(2)]
        assert [(r.kind, r.values) for r in env.sink.records] == [
            (RecordKind.CLAIM, {"secretKey": "", "durationMs": 0}),
            (RecordKind.ATTRIBUTES, {"x": True}),
        ]
        await client.close()

    run(tmp_path, scenario)


def test_drain_answers_admitted_messages_then_says_goodbye(tmp_path: Path) -> None:
    sink = MemorySink()

    async def scenario(env: Env) -> None:
        client = await Client.connected(env.port, 5)
        sink.gate.clear()
        await client.send(Publish(TELEMETRY, b'{"a":1}', 1, 1))
        await asyncio.sleep(0.1)
        env.server.stop_accepting()
        drain = asyncio.create_task(env.server.drain())
        await asyncio.sleep(0.1)
        assert not drain.done()
        sink.gate.set()
        await drain
        assert await client.until_closed() == [PubAck(1), Disconnect(0x8B)]

    run(tmp_path, scenario, sink)


# --- paho, in process (the real-client end-to-end runs against the gateway process in test_mqtt_e2e) ---


def paho_session(
    port: int, protocol: int, username: str, actions: Callable[[paho.Client], None], **tls: Any
) -> list[Any]:
    """Connect paho in its own thread, run ``actions``, return the reason codes of CONNACK and PUBACKs."""
    done = threading.Event()
    codes: list[Any] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=protocol)
    client.username_pw_set(username)
    if tls:
        client.tls_set_context(tls["context"])

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        codes.append(reason.value if hasattr(reason, "value") else reason)
        if not reason.is_failure:
            actions(c)
        else:
            done.set()

    def on_publish(c: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        codes.append(("puback", mid, reason.value))
        done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes


@pytest.mark.parametrize("protocol", [paho.MQTTv31, paho.MQTTv311, paho.MQTTv5])
def test_paho_publishes(tmp_path: Path, protocol: int) -> None:
    async def scenario(env: Env) -> None:
        codes = await asyncio.to_thread(
            paho_session, env.port, protocol, "T1", lambda c: c.publish(TELEMETRY, '{"paho":1}', qos=1)
        )
        assert codes == [0, ("puback", 1, 0)]
        assert env.sink.records[0].values == {"paho": 1}
        bad = await asyncio.to_thread(paho_session, env.port, protocol, "bad", lambda c: None)
        # paho shows the 3.x CONNACK code 5 as reason 0x87 "Not authorized"; v5 gets 0x86 on the wire
        assert bad == [0x86 if protocol == paho.MQTTv5 else 0x87]

    run(tmp_path, scenario)


def test_paho_v5_sees_puback_0x97_when_the_spool_is_full(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.outcome_for["dev1"] = Outcome.SPOOL_FULL

    async def scenario(env: Env) -> None:
        props = Properties(PacketTypes.PUBLISH)
        codes = await asyncio.to_thread(
            paho_session,
            env.port,
            paho.MQTTv5,
            "T1",
            lambda c: c.publish(TELEMETRY, '{"a":1}', qos=1, properties=props),
        )
        assert codes == [0, ("puback", 1, 0x97)]

    run(tmp_path, scenario, sink)


def test_tls_listener(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def scenario(env: Env) -> None:
        assert len(env.server.ports) == 2
        tls_port = env.server.ports[1]
        client = await Client.open(tls_port, 5, tls=client_context)
        assert (await client.connect()).reason_code == 0
        await client.send(Publish(TELEMETRY, b'{"tls":1}', 1, 1))
        assert await client.recv() == PubAck(1)
        await client.close()
        codes = await asyncio.to_thread(
            paho_session,
            tls_port,
            paho.MQTTv311,
            "T1",
            lambda c: c.publish(TELEMETRY, '{"tls":2}', qos=1),
            context=client_context,
        )
        assert codes == [0, ("puback", 1, 0)]
        assert [r.values for r in env.sink.records] == [{"tls": 1}, {"tls": 2}]
        untrusted = ssl.create_default_context()  # does not know the test CA
        with pytest.raises(ssl.SSLError):
            await Client.open(tls_port, 5, tls=untrusted)

    run(tmp_path, scenario, tls=server_context, mqtt_ssl_enabled=True)


def test_a_silent_socket_on_the_tls_port_is_closed_at_the_connect_timeout(tmp_path: Path) -> None:
    """No handshake at all: closed like a plain socket that sends no CONNECT (asyncio's default 60 s left a
    slowloris opening on the TLS port)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)

    async def scenario(env: Env) -> None:
        loop = asyncio.get_running_loop()
        for port in env.server.ports:  # plain, then TLS
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the gateway
            assert loop.time() - started < 3.0
            writer.close()
            await writer.wait_closed()

    run(tmp_path, scenario, tls=server_context, mqtt_ssl_enabled=True, mqtt_connect_timeout_seconds=0.5)


def test_tls_settings_from_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def scenario(env: Env) -> None:
        client = await Client.open(env.server.ports[1], 4, tls=client_context)
        assert (await client.connect()).reason_code == 0
        await client.close()

    run(
        tmp_path,
        scenario,
        mqtt_ssl_enabled=True,
        mqtt_ssl_cert_file=tmp_path / "server.pem",
        mqtt_ssl_key_file=tmp_path / "server.pem",
    )
