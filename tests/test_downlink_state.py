"""Shared attributes, client-side RPC and device state (downlink/), with fake sessions and an explicit clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tb_gateway.attributes import CLIENT, SHARED
from tb_gateway.downlink.client_rpc import ClientRpcTable, parse_request
from tb_gateway.downlink.device_state import DeviceStateTracker, StateEvent
from tb_gateway.downlink.sessions import Feature
from tb_gateway.downlink.shared_attributes import SharedChange, parse_change
from tb_gateway.errors import PayloadError
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tests.downlink_support import DEVICE, OTHER, T0, Clock, FakePipeline, FakeSession, make_hub

# --------------------------------------------------------------------------- shared attributes


def test_shared_updates_are_stored_and_pushed_to_attribute_subscribers_only(tmp_path: Path) -> None:
    hub, store = make_hub(tmp_path, Clock(), FakePipeline())
    subscriber, rpc_only, other = FakeSession(), FakeSession(), FakeSession(device=OTHER)
    hub.subscribe(subscriber, Feature.ATTRIBUTES)
    hub.subscribe(rpc_only, Feature.RPC)
    hub.subscribe(other, Feature.ATTRIBUTES)
    store.update(DEVICE.id, CLIENT, {"fw": "1.0"})

    assert hub.change_shared(DEVICE.id, SharedChange({"mode": "eco", "target": 21})) == {"mode": "eco", "target": 21}
    assert hub.change_shared(DEVICE.id, SharedChange({"target": 22}, ("mode", "absent"))) == {
        "target": 22,
        "deleted": ["mode"],  # only keys that existed
    }
    assert hub.change_shared(DEVICE.id, SharedChange({}, ("absent",))) is None  # nothing changed: nothing pushed
    assert subscriber.attributes == [{"mode": "eco", "target": 21}, {"target": 22, "deleted": ["mode"]}]
    assert rpc_only.attributes == [] and other.attributes == []
    assert store.get(DEVICE.id, SHARED) == {"target": 22} and store.get(DEVICE.id, CLIENT) == {"fw": "1.0"}
    assert store.request(DEVICE.id, None, ["target"]) == {"shared": {"target": 22}}
    assert hub.shared_snapshot(DEVICE.id) == {"target": 22} and hub.shared_snapshot(OTHER.id) == {}

    hub.unsubscribe(subscriber, Feature.ATTRIBUTES)
    hub.change_shared(DEVICE.id, SharedChange({"target": 23}))
    assert len(subscriber.attributes) == 2


def test_replace_form_pushes_only_the_difference(tmp_path: Path) -> None:
    hub, store = make_hub(tmp_path, Clock(), FakePipeline())
    session = FakeSession(transport=Transport.COAP, connection=False)
    hub.subscribe(session, Feature.ATTRIBUTES)
    hub.change_shared(DEVICE.id, parse_change({"values": {"a": 1, "b": "x", "c": True}}))
    hub.change_shared(DEVICE.id, parse_change({"values": {"a": 1, "b": "y", "c": 1}}))  # true -> 1 is a change
    hub.change_shared(DEVICE.id, parse_change({"values": {"a": 1, "b": "y", "c": 1}}))  # read again: nothing
    hub.change_shared(DEVICE.id, parse_change({"values": {"b": "y"}}))
    hub.change_shared(DEVICE.id, parse_change(None))  # a Kafka tombstone: everything goes
    assert session.attributes == [
        {"a": 1, "b": "x", "c": True},
        {"b": "y", "c": 1},
        {"deleted": ["a", "c"]},
        {"deleted": ["b"]},
    ]
    assert store.get(DEVICE.id, SHARED) == {}


def test_parse_change_forms_and_refusals() -> None:
    assert parse_change({"update": {"a": 1, "gone": None}, "delete": ["b"]}) == SharedChange({"a": 1}, ("b",))
    assert parse_change({"delete": ["b"]}) == SharedChange({}, ("b",))
    assert parse_change({"values": {}, "device_id": "d"}) == SharedChange({}, replace=True)
    for bad in (
        [1],
        "text",
        {},
        {"update": [1]},
        {"delete": "a"},
        {"delete": [1]},
        {"values": [1]},
        {"values": {}, "update": {"a": 1}},
        {"other": 1},
    ):
        with pytest.raises(PayloadError):
            parse_change(bad)


# --------------------------------------------------------------------------- client-side RPC


def test_client_rpc_table_ids_replies_and_deadlines() -> None:
    table = ClientRpcTable("w3-abc", timeout_ms=60_000, max_pending=2)
    first = table.open("d", "getTime", {}, T0)
    second = table.open("e", "getTime", None, T0 + 10)
    assert first is not None and second is not None
    assert (first.id, second.id, first.deadline) == ("w3-abc-1", "w3-abc-2", T0 + 60_000)
    assert table.open("d", "x", None, T0) is None  # full
    assert table.reply(first.id, "e") is None  # not that device's request
    assert table.reply(first.id, "d") == first and table.reply(first.id, "d") is None
    assert table.next_deadline() == T0 + 60_010
    assert table.expire(T0 + 60_009) == [] and table.expire(T0 + 60_010) == [second]
    assert len(table) == 0 and table.next_deadline() is None
    assert table.owns("w3-abc-5") and not table.owns("w3-abcd-5") and not table.owns("w3-ab-5")
    assert parse_request({"method": "m"}) == ("m", None)
    for bad in ([], {"params": 1}, {"method": ""}, {"method": 3}):
        with pytest.raises(PayloadError):
            parse_request(bad)


def test_client_rpc_through_the_hub(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline, client_rpc_timeout_ms=60_000)
        answered = hub.client_rpc(DEVICE, Transport.MQTT, "getCurrentTime", {"tz": "UTC"})
        silent = hub.client_rpc(DEVICE, Transport.HTTP, "getWeather", None)
        limits = hub.client_rpc(DEVICE, Transport.MQTT, "getSessionLimits", {"timeout": 5000})
        assert limits.result() == {"maxPayloadSize": 65536}  # answered locally, never forwarded
        requests = pipeline.of(RecordKind.RPC_REQUEST)
        assert requests == [
            {"id": "w0-1", "method": "getCurrentTime", "params": {"tz": "UTC"}},
            {"id": "w0-2", "method": "getWeather", "params": None},
        ]
        assert [r.transport for r in pipeline.records] == [Transport.MQTT, Transport.HTTP]
        assert not hub.client_rpc_reply("w0-1", {"time": 1}, device_id=OTHER.id)  # another device's id
        assert hub.client_rpc_reply("w0-1", {"time": 1}, device_id=DEVICE.id)
        assert answered.result() == {"time": 1}
        assert not hub.client_rpc_reply("w0-1", {"time": 2})  # answered already
        clock.advance(59_999)
        hub.tick()
        assert not silent.done()
        clock.advance(1)
        hub.tick()
        assert silent.result() == {"error": "timeout"}
        assert not hub.client_rpc_reply("w0-2", "late")

    asyncio.run(scenario())


def test_client_rpc_refused_when_its_record_is_not_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        pipeline = FakePipeline()
        hub, _ = make_hub(tmp_path, Clock(), pipeline, client_rpc_max_pending=1)
        pipeline.answer = Outcome.QUEUE_FULL
        assert hub.client_rpc(DEVICE, Transport.COAP, "m", None).result() == {"error": "queue_full"}
        pipeline.answer = None  # admitted, then the sink fails it
        later = hub.client_rpc(DEVICE, Transport.COAP, "m", None)
        assert hub.client_rpc(DEVICE, Transport.COAP, "m", None).result() == {"error": "too many pending requests"}
        pipeline.futures[0].set_result(Outcome.SINK_FAILED)
        await asyncio.sleep(0)
        assert later.result() == {"error": "sink_failed"}
        assert len(hub.client_rpc_table) == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------- device state


def events(changes: Any) -> list[tuple[str, bool, int | None, int | None, int | None]]:
    return [(c.event.value, c.active, c.last_connect, c.last_disconnect, c.last_activity) for c in changes]


def test_connect_disconnect_and_several_connections() -> None:
    tracker = DeviceStateTracker(inactivity_timeout_ms=600_000)
    assert events(tracker.connected(DEVICE, Transport.MQTT, T0)) == [("connect", True, T0, None, T0)]
    assert tracker.connected(DEVICE, Transport.MQTT, T0 + 1) == ()  # a second connection: still connected
    assert tracker.activity(DEVICE, Transport.MQTT, T0 + 2) == ()
    assert tracker.disconnected(DEVICE, Transport.MQTT, T0 + 3) == ()
    assert events(tracker.disconnected(DEVICE, Transport.MQTT, T0 + 4)) == [("disconnect", False, T0, T0 + 4, T0 + 2)]
    assert tracker.disconnected(DEVICE, Transport.MQTT, T0 + 5) == ()  # unbalanced close: ignored
    assert tracker.active == 0 and tracker.expire(T0 + 10**9) == []  # no inactivity after a disconnect
    assert tracker.state(DEVICE.id) == {
        "active": False,
        "lastConnectTime": T0,
        "lastDisconnectTime": T0 + 4,
        "lastActivityTime": T0 + 2,
    }
    assert tracker.state("unknown") is None


def test_http_and_coap_devices_are_active_while_they_send_within_the_window() -> None:
    tracker = DeviceStateTracker(inactivity_timeout_ms=1000)
    assert events(tracker.activity(DEVICE, Transport.HTTP, T0)) == [("activity", True, None, None, T0)]
    assert tracker.activity(DEVICE, Transport.HTTP, T0 + 900) == ()  # within the window: nothing to report
    assert tracker.next_deadline() == T0 + 1000
    assert tracker.expire(T0 + 1000) == []  # it sent at +900: looks again at +1900
    assert tracker.next_deadline() == T0 + 1900
    [inactive] = tracker.expire(T0 + 1900)
    assert inactive.event is StateEvent.INACTIVITY and inactive.values() == {
        "event": "inactivity",
        "active": False,
        "lastConnectTime": None,
        "lastDisconnectTime": None,
        "lastActivityTime": T0 + 900,
    }
    assert inactive.transport is Transport.HTTP and tracker.active == 0 and tracker.next_deadline() is None
    assert events(tracker.activity(DEVICE, Transport.COAP, T0 + 5000)) == [("activity", True, None, None, T0 + 5000)]


def test_a_silent_connection_becomes_inactive_and_a_ping_revives_it() -> None:
    tracker = DeviceStateTracker(inactivity_timeout_ms=1000)
    tracker.connected(DEVICE, Transport.MQTT, T0)
    assert events(tracker.expire(T0 + 1000)) == [("inactivity", False, T0, None, T0)]
    assert events(tracker.activity(DEVICE, Transport.MQTT, T0 + 1500)) == [("activity", True, T0, None, T0 + 1500)]
    assert events(tracker.disconnected(DEVICE, Transport.MQTT, T0 + 1600)) == [
        ("disconnect", False, T0, T0 + 1600, T0 + 1500)
    ]
    # reconnecting quickly leaves one live check, not a stale one that would fire early
    tracker.connected(DEVICE, Transport.MQTT, T0 + 1700)
    assert tracker.next_deadline() == T0 + 2700 and tracker.expire(T0 + 2600) == []


def test_an_open_coap_observation_does_not_keep_a_silent_device_active(tmp_path: Path) -> None:
    clock, pipeline = Clock(), FakePipeline()
    hub, _ = make_hub(tmp_path, clock, pipeline, inactivity_timeout_ms=600_000)
    observation = FakeSession(transport=Transport.COAP, connection=False)
    hub.activity(DEVICE, Transport.COAP)  # the GET with Observe is a request: activity
    hub.attach(observation)
    hub.subscribe(observation, Feature.RPC)
    clock.advance(599_999)
    hub.tick()
    assert hub.device_state(DEVICE.id) is not None and hub.device_state(DEVICE.id)["active"] is True  # type: ignore[index]
    clock.advance(1)
    hub.tick()  # the observation is still registered, the device said nothing for 600 s
    assert hub.sessions.subscribers(DEVICE.id, Feature.RPC) == [observation]
    states = pipeline.of(RecordKind.DEVICE_STATE)
    assert [(s["event"], s["active"]) for s in states] == [("activity", True), ("inactivity", False)]
    hub.detach(observation)  # an observation's end is not a disconnect
    assert len(pipeline.of(RecordKind.DEVICE_STATE)) == 2


def test_hub_state_records_for_an_mqtt_connection(tmp_path: Path) -> None:
    clock, pipeline = Clock(), FakePipeline()
    hub, _ = make_hub(tmp_path, clock, pipeline)
    session = FakeSession()
    hub.attach(session)
    clock.advance(5)
    hub.activity(DEVICE, Transport.MQTT)
    clock.advance(5)
    hub.detach(session)
    hub.detach(session)  # twice: reported once
    records = [r for r in pipeline.records if r.kind is RecordKind.DEVICE_STATE]
    assert [(r.ts, r.device, r.transport, r.values) for r in records] == [
        (
            T0,
            DEVICE,
            Transport.MQTT,
            {
                "event": "connect",
                "active": True,
                "lastConnectTime": T0,
                "lastDisconnectTime": None,
                "lastActivityTime": T0,
            },
        ),
        (
            T0 + 10,
            DEVICE,
            Transport.MQTT,
            {
                "event": "disconnect",
                "active": False,
                "lastConnectTime": T0,
                "lastDisconnectTime": T0 + 10,
                "lastActivityTime": T0 + 5,
            },
        ),
    ]


def test_the_tracker_forgets_the_longest_dormant_devices_beyond_its_cap() -> None:
    tracker = DeviceStateTracker(inactivity_timeout_ms=1000, max_devices=3)
    a, b, c, d, e = (DeviceIdentity(f"id-{n}", n) for n in "abcde")
    tracker.connected(a, Transport.MQTT, T0)
    tracker.activity(b, Transport.HTTP, T0)
    tracker.connected(c, Transport.MQTT, T0)
    tracker.disconnected(c, Transport.MQTT, T0 + 10)  # dormant since +10
    tracker.expire(T0 + 1000)  # b (HTTP) inactive since +1000; a is inactive too but still connected
    assert tracker.take_forgotten() == []

    tracker.activity(d, Transport.COAP, T0 + 2000)  # a fourth device: c has been dormant longest
    assert tracker.take_forgotten() == ["id-c"] and tracker.state("id-c") is None
    tracker.activity(e, Transport.COAP, T0 + 2001)  # then b; a is connected and never goes
    assert tracker.take_forgotten() == ["id-b"] and tracker.take_forgotten() == []
    assert set(tracker.devices) == {"id-a", "id-d", "id-e"}

    f = DeviceIdentity("id-f", "f")
    tracker.activity(f, Transport.HTTP, T0 + 2002)  # nobody is dormant: the cap gives way, nothing is lost
    assert tracker.take_forgotten() == [] and len(tracker.devices) == 4
    tracker.disconnected(a, Transport.MQTT, T0 + 2003)
    assert [last_activity for *_, last_activity in events(tracker.expire(T0 + 3002))] == [
        T0 + 2000,
        T0 + 2001,
        T0 + 2002,
    ]  # d, e, f inactive
    tracker.activity(d, Transport.COAP, T0 + 3003)  # d comes back: active, not dormant any more

    # a forgotten device that comes back starts afresh; the dormant ones go oldest first (a, then e, f)
    assert events(tracker.connected(c, Transport.MQTT, T0 + 4000)) == [("connect", True, T0 + 4000, None, T0 + 4000)]
    assert tracker.take_forgotten() == ["id-a", "id-e"]
    assert set(tracker.devices) == {"id-c", "id-d", "id-f"}


def test_the_hub_drops_what_it_kept_for_forgotten_devices_but_not_their_pending_rpcs(tmp_path: Path) -> None:
    clock, pipeline = Clock(), FakePipeline()
    hub, _ = make_hub(tmp_path, clock, pipeline, max_tracked_devices=1, inactivity_timeout_ms=1000)

    async def main() -> None:
        session = FakeSession()
        hub.attach(session)
        hub.detach(session)  # DEVICE is dormant
        _, pending = hub.send_rpc(DEVICE.id, "m", None, timeout_ms=60_000, device=DEVICE)  # waits for it
        hub.activity(OTHER, Transport.HTTP)  # over the cap: DEVICE's state goes, its RPC stays
        assert hub.device_state(DEVICE.id) is None and hub.device_state(OTHER.id) is not None
        assert hub.rpc.pending == 1
        clock.advance(60_000)
        hub.tick()
        assert (await pending).status.value == "expired"
        named = {r.device.name for r in pipeline.records if r.kind is RecordKind.RPC_RESPONSE}
        assert named == {DEVICE.name}  # its records still carry its name, not just its id

        clock.advance(1000)
        hub.tick()  # OTHER inactive
        hub.activity(DEVICE, Transport.HTTP)  # OTHER goes, with nothing pending: all of it
        assert hub.device_state(OTHER.id) is None
        assert hub.send_rpc(OTHER.id, "m", None, timeout_ms=1)[0].id == 1  # its ids start again
        assert hub._metrics.registry.get_sample_value("tb_gateway_device_states_forgotten_total") == 2

    asyncio.run(main())
