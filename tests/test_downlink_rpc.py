"""Server-side RPC lifecycle (downlink/rpc.py and the hub around it), with fake sessions and an explicit clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tb_gateway.downlink.rpc import MAX_ID, RpcManager, RpcOutcome, RpcStatus
from tb_gateway.downlink.sessions import Delivery, Feature, RpcCall, SessionRegistry
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tests.downlink_support import DEVICE, OTHER, T0, Clock, FakePipeline, FakeSession, make_hub


def statuses(outcomes: list[RpcOutcome] | None) -> list[tuple[int, str]]:
    assert outcomes is not None
    return [(o.request.id, o.status.value) for o in outcomes]


def manager(max_pending: int = 100) -> tuple[RpcManager, SessionRegistry]:
    sessions = SessionRegistry()
    return RpcManager(sessions, max_pending_per_device=max_pending), sessions


def subscribed(sessions: SessionRegistry, session: FakeSession) -> FakeSession:
    sessions.subscribe(session, Feature.RPC)
    return session


def test_ids_are_per_device_ints_from_one() -> None:
    rpc, _ = manager()
    ids = [rpc.submit(d, "m", None, oneway=False, expires_at=T0 + 1000, now=T0)[0].id for d in ("a", "a", "b", "a")]
    assert ids == [1, 2, 1, 3]


def test_id_wraps_within_int32() -> None:
    rpc, _ = manager()
    first, _ = rpc.submit("a", "m", None, oneway=True, expires_at=T0 + 1, now=T0)
    rpc._devices["a"].next_id = MAX_ID
    last, _ = rpc.submit("a", "m", None, oneway=True, expires_at=T0 + 1, now=T0)
    wrapped, _ = rpc.submit("a", "m", None, oneway=True, expires_at=T0 + 1, now=T0)
    assert (first.id, last.id, wrapped.id) == (1, MAX_ID, 1)


def test_pending_until_a_session_subscribes_then_delivered_and_replied() -> None:
    rpc, sessions = manager()
    _, outcomes = rpc.submit(DEVICE.id, "setGpio", {"pin": 4}, oneway=False, expires_at=T0 + 10_000, now=T0)
    assert outcomes == [] and rpc.pending == 1
    session = FakeSession()
    sessions.attach(session)
    assert rpc.subscribed(DEVICE.id, T0 + 5) == [] and session.rpcs == []  # attached, not subscribed to RPC
    session = subscribed(sessions, session)
    assert rpc.subscribed(DEVICE.id, T0 + 10) == []  # SENT: waits for the device's acknowledgement
    assert session.rpcs == [RpcCall(1, "setGpio", {"pin": 4})]
    assert session.rpcs[0].body() == {"id": 1, "method": "setGpio", "params": {"pin": 4}}
    assert statuses(rpc.delivered(DEVICE.id, 1, T0 + 20)) == [(1, "delivered")]
    assert rpc.delivered(DEVICE.id, 1, T0 + 21) == []  # a second ack reports nothing new
    replied = rpc.replied(DEVICE.id, 1, {"ok": True}, T0 + 30)
    assert statuses(replied) == [(1, "replied")]
    assert replied is not None and replied[0].response == {"ok": True} and replied[0].transport is Transport.MQTT
    assert rpc.pending == 0 and rpc.next_deadline() is None
    assert rpc.replied(DEVICE.id, 1, {"ok": True}, T0 + 40) is None  # already answered


def test_reply_without_ack_reports_delivered_first() -> None:
    rpc, sessions = manager()
    subscribed(sessions, FakeSession())
    rpc.submit(DEVICE.id, "m", None, oneway=False, expires_at=T0 + 1000, now=T0)
    assert statuses(rpc.replied(DEVICE.id, 1, "done", T0 + 1)) == [(1, "delivered"), (1, "replied")]


def test_expiry_unsent_is_expired_sent_or_delivered_is_timeout() -> None:
    rpc, sessions = manager()
    rpc.submit(DEVICE.id, "never-sent", None, oneway=False, expires_at=T0 + 100, now=T0)
    session = subscribed(sessions, FakeSession(device=OTHER))
    rpc.submit(OTHER.id, "sent", None, oneway=False, expires_at=T0 + 200, now=T0)
    rpc.submit(OTHER.id, "delivered", None, oneway=False, expires_at=T0 + 300, now=T0)
    rpc.delivered(OTHER.id, 2, T0 + 1)
    assert len(session.rpcs) == 2
    assert rpc.next_deadline() == T0 + 100
    assert rpc.expire(T0 + 99) == []
    assert [(o.request.method, o.status) for o in rpc.expire(T0 + 300)] == [
        ("never-sent", RpcStatus.EXPIRED),
        ("sent", RpcStatus.TIMEOUT),
        ("delivered", RpcStatus.TIMEOUT),
    ]
    assert rpc.pending == 0 and rpc.next_deadline() is None
    assert rpc.replied(OTHER.id, 2, "late", T0 + 301) is None


def test_oneway_ends_at_delivered_and_takes_no_reply() -> None:
    rpc, sessions = manager()
    session = subscribed(sessions, FakeSession(answer=Delivery.DELIVERED))  # e.g. QoS 0, HTTP long poll
    _, outcomes = rpc.submit(DEVICE.id, "reboot", None, oneway=True, expires_at=T0 + 1000, now=T0)
    assert statuses(outcomes) == [(1, "delivered")] and outcomes[0].final
    assert rpc.pending == 0 and rpc.replied(DEVICE.id, 1, "x", T0) is None
    assert session.rpcs == [RpcCall(1, "reboot", None)]


def test_a_session_closing_unacknowledged_hands_the_request_to_the_next() -> None:
    rpc, sessions = manager()
    first = subscribed(sessions, FakeSession())
    rpc.submit(DEVICE.id, "m", 1, oneway=False, expires_at=T0 + 1000, now=T0)
    sessions.detach(first)
    assert rpc.session_closed(first, T0 + 1) == []  # no other session: waits
    second = subscribed(sessions, FakeSession())
    rpc.subscribed(DEVICE.id, T0 + 2)
    assert second.rpcs == [RpcCall(1, "m", 1)]  # same id, delivered again
    assert rpc.session_closed(first, T0 + 3) == []  # the old session no longer holds it
    assert statuses(rpc.delivered(DEVICE.id, 1, T0 + 4)) == [(1, "delivered")]


def test_refusing_sessions_are_skipped_and_order_is_kept() -> None:
    rpc, sessions = manager()
    for n in range(3):
        rpc.submit(DEVICE.id, f"m{n}", None, oneway=False, expires_at=T0 + 1000, now=T0)
    refusing = subscribed(sessions, FakeSession(answer=Delivery.REFUSED))
    taking = subscribed(sessions, FakeSession())
    rpc.subscribed(DEVICE.id, T0)
    assert refusing.rpcs == [] and [c.method for c in taking.rpcs] == ["m0", "m1", "m2"]


def test_rejected_over_the_per_device_limit_or_already_expired() -> None:
    rpc, _ = manager(max_pending=2)
    for _ in range(2):
        assert rpc.submit("a", "m", None, oneway=False, expires_at=T0 + 10, now=T0)[1] == []
    _, outcomes = rpc.submit("a", "m", None, oneway=False, expires_at=T0 + 10, now=T0)
    assert statuses(outcomes) == [(3, "rejected")] and outcomes[0].final
    assert statuses(rpc.submit("b", "m", None, oneway=False, expires_at=T0, now=T0)[1]) == [(1, "rejected")]
    assert rpc.pending == 2 and rpc.replied("a", 3, "x", T0) is None


def test_replies_for_unknown_ids_or_other_devices_match_nothing() -> None:
    rpc, sessions = manager()
    subscribed(sessions, FakeSession())
    rpc.submit(DEVICE.id, "m", None, oneway=False, expires_at=T0 + 10, now=T0)
    assert rpc.replied(DEVICE.id, 99, "x", T0) is None
    assert rpc.replied(OTHER.id, 1, "x", T0) is None
    assert rpc.delivered(OTHER.id, 1, T0) == [] and rpc.pending == 1


def test_cancel_all_at_shutdown() -> None:
    rpc, _ = manager()
    rpc.submit("a", "m", None, oneway=False, expires_at=T0 + 10, now=T0)
    rpc.submit("b", "m", None, oneway=True, expires_at=T0 + 10, now=T0)
    assert sorted(o.status.value for o in rpc.cancel_all(T0)) == ["cancelled", "cancelled"]
    assert rpc.pending == 0 and rpc.next_deadline() is None


# --------------------------------------------------------------------------- the hub around it


def test_hub_reports_every_step_as_records_and_resolves_the_waiter(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline)
        request, outcome = hub.send_rpc(DEVICE.id, "setGpio", {"pin": 4}, timeout_ms=5000, request_id="corr-7")
        assert request.expires_at == T0 + 5000 and not outcome.done()
        session = FakeSession()
        hub.attach(session)
        hub.subscribe(session, Feature.RPC)
        assert session.rpcs == [RpcCall(1, "setGpio", {"pin": 4})]
        clock.advance(3)
        hub.rpc_delivered(DEVICE.id, 1)
        assert not outcome.done()
        clock.advance(4)
        assert hub.rpc_replied(DEVICE.id, 1, b'{"pin":4,"value":1}')
        assert outcome.done() and outcome.result().status is RpcStatus.REPLIED
        assert outcome.result().response == {"pin": 4, "value": 1}
        rpc_records = [r for r in pipeline.records if r.kind is RecordKind.RPC_RESPONSE]
        assert [r.values for r in rpc_records] == [
            {
                "id": 1,
                "requestId": "corr-7",
                "method": "setGpio",
                "oneway": False,
                "status": "delivered",
                "response": None,
            },
            {
                "id": 1,
                "requestId": "corr-7",
                "method": "setGpio",
                "oneway": False,
                "status": "replied",
                "response": {"pin": 4, "value": 1},
            },
        ]
        assert [(r.ts, r.transport, r.device) for r in rpc_records] == [
            (T0 + 3, Transport.MQTT, DEVICE),
            (T0 + 7, Transport.MQTT, DEVICE),
        ]
        assert not hub.rpc_replied(DEVICE.id, 1, b"again")  # late duplicate: not matched, counted
        assert hub.rpc_replied(DEVICE.id, 2, b"x") is False

    asyncio.run(scenario())


def test_hub_non_json_reply_is_kept_as_text_and_expiry_is_reported_by_the_gateway(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline, rpc_default_timeout_ms=1000, rpc_max_timeout_ms=2000)
        _, waiting = hub.send_rpc("ghost", "m", None)  # no such device connected: waits, then expires
        _, capped = hub.send_rpc("ghost", "m", None, timeout_ms=60_000)
        assert hub.next_deadline() == T0 + 1000
        clock.advance(1000)
        hub.tick()
        assert waiting.result().status is RpcStatus.EXPIRED and not capped.done()
        clock.advance(1000)
        hub.tick()
        assert capped.result().status is RpcStatus.EXPIRED  # RPC_MAX_TIMEOUT_SECONDS caps every expiry
        expired = [r for r in pipeline.records if r.kind is RecordKind.RPC_RESPONSE]
        assert [(r.transport, r.device.name, r.values["status"]) for r in expired] == [
            (Transport.GATEWAY, "ghost", "expired")
        ] * 2
        session = FakeSession()
        hub.subscribe(session, Feature.RPC)
        _, answered = hub.send_rpc(DEVICE.id, "m", None)
        assert hub.rpc_replied(DEVICE.id, session.rpcs[0].id, b"not json \xff")
        assert answered.result().response == "not json \ufffd"

    asyncio.run(scenario())


def test_hub_close_cancels_pending_and_ends_observations(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline)
        connection, observation = FakeSession(), FakeSession(transport=Transport.COAP, connection=False)
        hub.attach(connection)
        hub.subscribe(observation, Feature.RPC)
        _, pending = hub.send_rpc(OTHER.id, "m", None)
        waiting = hub.client_rpc(DEVICE, Transport.MQTT, "m", None)
        hub.close()
        assert pending.result().status is RpcStatus.CANCELLED
        assert waiting.result() == {"error": "gateway shutting down"}
        assert hub.client_rpc(DEVICE, Transport.MQTT, "m", None).result() == {"error": "gateway shutting down"}
        # the transport's drain closes connections (answering what they sent first); the hub ends the others
        assert connection.closed == [] and observation.closed == ["shutdown"]

    asyncio.run(scenario())


def test_hub_run_fires_deadlines_on_the_real_clock(tmp_path: Path) -> None:
    async def scenario() -> None:
        pipeline = FakePipeline()
        from tb_gateway.attributes import AttributeStore
        from tb_gateway.downlink.hub import Downlink
        from tb_gateway.metrics import Metrics

        hub = Downlink(
            AttributeStore(tmp_path / "a.db"), Metrics(), submit=pipeline.submit, session_limits=dict, instance="w"
        )
        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(hub.run())
            await asyncio.sleep(0.01)  # the loop sleeps with nothing to do; a new request wakes it
            _, outcome = hub.send_rpc("d", "m", None, timeout_ms=50)
            result = await asyncio.wait_for(outcome, 2)
            hub.close()
            await asyncio.wait_for(runner, 2)
        assert result.status is RpcStatus.EXPIRED

    asyncio.run(scenario())


@pytest.mark.parametrize("payload", [b"", b"null", b"[1,2]", b'"text"'])
def test_hub_reply_payload_forms(tmp_path: Path, payload: bytes) -> None:
    async def scenario() -> None:
        hub, _ = make_hub(tmp_path, Clock(), FakePipeline())
        session = FakeSession()
        hub.subscribe(session, Feature.RPC)
        _, outcome = hub.send_rpc(DEVICE.id, "m", None)
        assert hub.rpc_replied(DEVICE.id, 1, payload)
        expected = {b"": "", b"null": None, b"[1,2]": [1, 2], b'"text"': "text"}[payload]
        assert outcome.result().response == expected

    asyncio.run(scenario())


# --------------------------------------------------------------------------- nothing kept once nothing is pending


def test_a_stale_expiry_of_a_forgotten_device_does_not_end_its_later_request_of_the_same_id() -> None:
    """A replied request's heap entry stays until its expiry; once the device is forgotten its ids restart,
    so that entry names a later request with the same id, which must not expire early (nor raise)."""
    rpc, sessions = manager()
    subscribed(sessions, FakeSession(answer=Delivery.DELIVERED))
    first, _ = rpc.submit(DEVICE.id, "m", None, oneway=False, expires_at=T0 + 1000, now=T0)
    assert statuses(rpc.replied(DEVICE.id, first.id, "ok", T0 + 10)) == [(1, "replied")]
    assert rpc.forget(DEVICE.id)
    assert rpc.expire(T0 + 20) == []  # the ended one's entry stays in the heap until T0 + 1000
    later, _ = rpc.submit(DEVICE.id, "m", None, oneway=False, expires_at=T0 + 5000, now=T0 + 30)
    assert later.id == first.id == 1
    gone, _ = rpc.submit(OTHER.id, "m", None, oneway=True, expires_at=T0 + 1000, now=T0)  # no session: waits
    assert [r.id for r in rpc.take_waiting(OTHER.id)] == [gone.id] and rpc.forget(OTHER.id)
    assert rpc.next_deadline() == T0 + 5000
    assert rpc.expire(T0 + 1000) == [] and rpc.pending == 1
    assert OTHER.id not in rpc._devices  # its stale entry skipped, nothing recreated
    assert statuses(rpc.expire(T0 + 5000)) == [(1, "timeout")]


def test_hub_keeps_nothing_for_devices_whose_rpcs_all_ended(tmp_path: Path) -> None:
    """Every way an RPC ends (expired, timeout, replied, one-way delivered, rejected) leaves nothing kept for
    a device that no session holds and the state tracker does not track (e.g. one that never connected)."""

    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline)
        ghosts = [DeviceIdentity(f"ghost-{i}", f"ghost {i}") for i in range(3)]
        futures = [hub.send_rpc(d.id, "m", None, timeout_ms=50, device=d)[1] for d in ghosts]
        _, rejected = hub.send_rpc("late", "m", None, expires_at=T0 - 1, device=DeviceIdentity("late", "late"))
        # a device polled once (a session that is no connection): sent, replied, one-way, and one timing out
        poll = FakeSession(OTHER, Transport.HTTP, connection=False, answer=Delivery.DELIVERED)
        hub.attach(poll)
        hub.subscribe(poll, Feature.RPC)
        _, replied = hub.send_rpc(OTHER.id, "m", None, timeout_ms=50)
        _, oneway = hub.send_rpc(OTHER.id, "m", None, oneway=True)
        _, timed_out = hub.send_rpc(OTHER.id, "m", None, timeout_ms=50)
        assert hub.rpc_replied(OTHER.id, 1, b"ok")
        hub.detach(poll)
        clock.advance(50)
        hub.tick()
        statuses_ = [f.result().status for f in (*futures, rejected, replied, oneway, timed_out)]
        assert statuses_ == [RpcStatus.EXPIRED] * 3 + [
            RpcStatus.REJECTED,
            RpcStatus.REPLIED,
            RpcStatus.DELIVERED,
            RpcStatus.TIMEOUT,
        ]
        expired = [r for r in pipeline.records if r.kind is RecordKind.RPC_RESPONSE and r.device in ghosts]
        assert [r.device.name for r in expired] == ["ghost 0", "ghost 1", "ghost 2"]  # named when reported
        await asyncio.sleep(0)
        assert hub.rpc._devices == {} and hub._identities == {} and hub.rpc.pending == 0
        assert hub.next_deadline() is None
        # ids restart once nothing is pending (docs/downlink.md)
        request, _ = hub.send_rpc(OTHER.id, "m", None)
        assert request.id == 1

    asyncio.run(scenario())


def test_hub_ids_never_restart_while_an_rpc_of_the_device_can_still_be_replied_to(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock, pipeline = Clock(), FakePipeline()
        hub, _ = make_hub(tmp_path, clock, pipeline)
        session = FakeSession(answer=Delivery.DELIVERED)
        hub.attach(session)
        hub.subscribe(session, Feature.RPC)
        first, _ = hub.send_rpc(DEVICE.id, "m", None)
        second, _ = hub.send_rpc(DEVICE.id, "m", None)
        assert hub.rpc_replied(DEVICE.id, first.id, b"1")
        await asyncio.sleep(0)
        third, _ = hub.send_rpc(DEVICE.id, "m", None)  # the second is still delivered, unreplied
        assert (first.id, second.id, third.id) == (1, 2, 3)
        assert hub.rpc_replied(DEVICE.id, second.id, b"2") and hub.rpc_replied(DEVICE.id, third.id, b"3")
        fourth, _ = hub.send_rpc(DEVICE.id, "m", None)  # in the same turn as the last reply: not yet released
        assert fourth.id == 4
        assert hub.rpc_replied(DEVICE.id, fourth.id, b"4")
        await asyncio.sleep(0)
        # nothing pending, but a session holds the device: its ids go on counting
        fifth, _ = hub.send_rpc(DEVICE.id, "m", None)
        assert fifth.id == 5 and hub.rpc_replied(DEVICE.id, fifth.id, b"5")
        hub.detach(session)
        await asyncio.sleep(0)
        # gone, nothing pending: the RPC entry goes; the identity stays while the state tracker tracks it
        assert DEVICE.id not in hub.rpc._devices and hub.identity(DEVICE.id) == DEVICE
        assert hub.send_rpc(DEVICE.id, "m", None)[0].id == 1
        assert not hub.rpc_replied(DEVICE.id, 5, b"late")  # an ended request's late reply still matches nothing

    asyncio.run(scenario())
