"""MQTT session state machine and ThingsBoard topic tables, in memory with an explicit clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.errors import PayloadError
from tb_gateway.mqtt import session as session_module
from tb_gateway.mqtt import topics
from tb_gateway.mqtt.codec import Decoder, encode
from tb_gateway.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from tb_gateway.mqtt.session import (
    AckQueue,
    ConnectionTerminated,
    ConnectReceived,
    Limits,
    PubAckReceived,
    Session,
    State,
    Subscribed,
    Unsubscribed,
    topic_matches,
)
from tb_gateway.records import RecordKind

LIMITS = Limits(max_packet_bytes=1000, max_topic_length=64, max_inflight=3, max_queued=4, connect_timeout_s=5.0)


def new(version: int = 4, keepalive: int = 10, accept: bool = True) -> Session:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    events = session.receive_data(encode(Connect("c", version, keepalive_s=keepalive, username="T"), version), 0.0)
    assert events == [ConnectReceived(Connect("c", version, keepalive_s=keepalive, username="T"))]
    assert session.state is State.AUTHENTICATING
    if accept:
        assert session.accept() == []
        assert session.state is State.CONNECTED
    return session


def replies(session: Session, version: int) -> list[Packet]:
    return Decoder(version=version).feed(session.data_to_send())


def send(session: Session, packet: Packet, version: int, now: float = 1.0) -> list[object]:
    return list(session.receive_data(encode(packet, version), now))


def test_connack_3_1_1_is_bare_and_v5_announces_the_limits_the_client_must_keep() -> None:
    s4 = new(4)
    assert s4.data_to_send() == bytes.fromhex("20020000")
    s5 = new(5)
    assert replies(s5, 5) == [ConnAck(0, False, {0x21: 3, 0x24: 1, 0x27: 1003})]  # 1 + 2 + 1000


def test_v5_empty_client_id_gets_an_assigned_one() -> None:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    session.receive_data(encode(Connect("", 5, username="T"), 5), 0.0)
    session.accept("dev-1")
    assert replies(session, 5)[0].properties[0x12] == "dev-1"  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [3, 4, 5])
def test_refusal_uses_the_code_of_the_client_version(version: int) -> None:
    session = new(version, accept=False)
    session.refuse(0x05, 0x86)
    assert replies(session, version) == [ConnAck(0x86 if version == 5 else 0x05)]
    assert session.state is State.TERMINATED
    assert session.receive_data(encode(PingReq(), version), 2.0) == []


def test_first_packet_must_be_connect() -> None:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    events = session.receive_data(encode(PingReq(), 4), 0.0)
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert session.data_to_send() == b""  # no version known: close without a word
    assert session.state is State.TERMINATED


def test_unknown_protocol_level_gets_connack_0x01() -> None:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    events = session.receive_data(bytes.fromhex("100c 00044d515454 06 02 003c 0000"), 0.0)
    assert events[0].reason_code == 0x84  # type: ignore[union-attr]
    assert session.data_to_send() == bytes.fromhex("20020001")


def test_v5_enhanced_authentication_is_refused_cleanly() -> None:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    events = session.receive_data(encode(Connect("c", 5, properties={0x15: "SCRAM-SHA-1"}), 5), 0.0)
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert replies(session, 5) == [ConnAck(0x8C)]


@pytest.mark.parametrize("prop", [0x21, 0x27])  # Receive Maximum, Maximum Packet Size
def test_v5_connect_with_a_zero_limit_is_a_protocol_error(prop: int) -> None:
    """Maximum Packet Size 0 used to be taken: every later answer was then too large to send, silently."""
    session = Session(LIMITS, 0.0, topics.accept_filter)
    events = session.receive_data(encode(Connect("c", 5, username="T", properties={prop: 0}), 5), 0.0)
    assert [type(e) for e in events] == [ConnectionTerminated] and events[0].refusal == "protocol_error"  # type: ignore[union-attr]
    assert replies(session, 5) == [ConnAck(0x82)]
    assert session.state is State.TERMINATED


def test_auth_packet_after_connect_is_a_protocol_error() -> None:
    session = new(5)
    session.data_to_send()
    events = send(session, Auth(0x18), 5)
    assert events == [ConnectionTerminated(0x82, "AUTH without an authentication method")]
    assert replies(session, 5) == [Disconnect(0x82)]


def test_packets_before_connack_are_held_and_released_by_accept() -> None:
    session = new(4, accept=False)
    publish = Publish("v1/devices/me/telemetry", b"{}", 1, 1)
    assert send(session, publish, 4) == []
    assert send(session, PingReq(), 4) == []
    assert session.accept() == [publish]
    assert replies(session, 4) == [ConnAck(0), PingResp()]
    assert session.inflight == 1


def test_too_many_packets_before_connack_is_quota_exceeded() -> None:
    session = new(5, accept=False)
    for _ in range(4):
        assert send(session, PingReq(), 5) == []
    events = send(session, PingReq(), 5)
    assert events == [ConnectionTerminated(0x97, "too many packets before CONNACK")]
    assert replies(session, 5) == [ConnAck(0x97)]
    assert session.accept() == []  # the late auth answer finds nothing to accept


def test_closing_before_connack_uses_a_connack_code() -> None:
    session = new(5, accept=False)
    session.close(0x8B, "server shutting down")
    assert replies(session, 5) == [ConnAck(0x89)]  # 0x8B is no CONNACK code: "server busy" instead
    assert session.state is State.TERMINATED


def test_second_connect_is_a_protocol_error() -> None:
    session = new(5)
    session.data_to_send()
    assert send(session, Connect("c", 5), 5)[0].reason_code == 0x82  # type: ignore[attr-defined]
    assert replies(session, 5) == [Disconnect(0x82)]


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_is_refused_as_documented(version: int) -> None:
    session = new(version)
    session.data_to_send()
    events = send(session, Publish("v1/devices/me/telemetry", b"{}", 2, 1), version)
    assert events == [ConnectionTerminated(0x9B, "QoS 2 is not supported")]
    assert replies(session, version) == ([Disconnect(0x9B)] if version == 5 else [])


def test_pubrel_from_client_is_a_protocol_error() -> None:
    session = new(5)
    session.data_to_send()
    assert send(session, PubRel(1), 5)[0].reason_code == 0x82  # type: ignore[attr-defined]


def test_topic_alias_is_refused() -> None:
    session = new(5)
    session.data_to_send()
    events = send(session, Publish("t", b"", 1, 1, properties={0x23: 1}), 5)
    assert events[0].reason_code == 0x94  # type: ignore[attr-defined]


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(("version", "goodbye"), [(4, []), (5, [Disconnect(0x82)])])
def test_publish_without_a_topic_is_a_protocol_error_every_time(version: int, goodbye: list[Packet], qos: int) -> None:
    """At QoS 1 too, whose hot path skips the per-packet checks (and a validated topic is remembered for the
    C decoder: the empty one never is)."""
    for whole_read in (True, False):
        session = new(version)
        session.data_to_send()
        empty = encode(Publish("", b"{}", qos, qos * 3), version)
        if whole_read:
            events = session.receive_data(empty, 1.0)
        else:  # a partial packet first, then the rest: not the one-packet read
            events = session.receive_data(empty[:3], 1.0) + session.receive_data(empty[3:], 1.0)
        assert [type(e) for e in events] == [ConnectionTerminated]
        assert events[0].reason_code in (0x82, 0x81)  # type: ignore[attr-defined]
        assert replies(session, version) == goodbye
        assert session.state is State.TERMINATED


@pytest.mark.parametrize(("version", "goodbye"), [(4, []), (5, [Disconnect(0x81)])])
def test_malformed_and_oversize_packets_end_the_session(version: int, goodbye: list[Packet]) -> None:
    for bad in (bytes.fromhex("3003 0005 61"), b"\x30" + bytes.fromhex("e907")):  # truncated topic; 1001 bytes
        session = new(version)
        session.data_to_send()
        ok = encode(Publish("v1/devices/me/telemetry", b"{}", 1, 9), version)
        events = session.receive_data(ok + bad, 1.0)
        assert events[0] == Publish("v1/devices/me/telemetry", b"{}", 1, 9)  # what came before is handled
        assert type(events[1]) is ConnectionTerminated
        assert replies(session, version) == goodbye
        assert session.state is State.TERMINATED


def test_inflight_window_and_acknowledge_in_any_version() -> None:
    session = new(5)
    session.data_to_send()
    for packet_id in (1, 2, 3):
        send(session, Publish("v1/devices/me/telemetry", b"{}", 1, packet_id), 5)
    assert session.inflight == 3 and session.window_full
    session.acknowledge(1)
    session.acknowledge(2, 0x97)
    assert not session.window_full
    assert replies(session, 5) == [PubAck(1), PubAck(2, 0x97)]


@pytest.mark.parametrize("queued", [False, True])
def test_acknowledge_delivered_now_is_acknowledge_then_data_to_send(queued: bool) -> None:
    """The adapter's one-call hot path writes what the two calls would, a downlink queued before first."""
    sessions = [new(4), new(4)]
    for session in sessions:
        session.data_to_send()
        for packet_id in (7, 8):
            send(session, Publish("v1/devices/me/telemetry", b"{}", 1, packet_id), 4)
        if queued:
            assert session.publish("v1/devices/me/rpc/request/1", b"{}")
    reference, fast = sessions
    reference.acknowledge_delivered([7, 8])
    expected = reference.data_to_send()
    assert fast.acknowledge_delivered_now([7, 8]) == expected
    assert fast.inflight == reference.inflight == 0
    assert fast.data_to_send() == b""
    assert Decoder(version=4).feed(expected)[-2:] == [PubAck(7), PubAck(8)]
    assert fast.acknowledge_delivered_now([]) == b""


def test_subscribe_accepts_exactly_the_thingsboard_filters() -> None:
    for version, refused in ((4, 0x80), (5, 0x8F)):
        session = new(version)
        session.data_to_send()
        wanted = (
            ("v1/devices/me/attributes", 1),
            ("v1/devices/me/rpc/request/+", 2),
            ("v1/devices/me/rpc/request/#", 1),
            ("v2/fw/response/+", 1),
            ("v1/devices/me/attributes/response/+", 0),
            ("$share/g/v1/devices/me/attributes", 1),
        )
        events = send(session, Subscribe(7, wanted), version)
        granted = (("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 1))
        assert events == [Subscribed((*granted, ("v1/devices/me/attributes/response/+", 0)))]
        assert replies(session, version) == [SubAck(7, (1, 1, refused, refused, 0, refused))]


def test_unsubscribe_reports_what_existed() -> None:
    session = new(5)
    send(session, Subscribe(1, (("v2/a", 1),)), 5)
    session.data_to_send()
    assert send(session, Unsubscribe(2, ("v2/a", "v2/t")), 5) == [Unsubscribed(("v2/a", "v2/t"))]
    assert replies(session, 5) == [UnsubAck(2, (0x00, 0x11))]
    session4 = new(4)
    session4.data_to_send()
    send(session4, Unsubscribe(2, ("v2/a",)), 4)
    assert replies(session4, 4) == [UnsubAck(2)]


def test_ping_and_client_puback_and_disconnect() -> None:
    session = new(5)
    session.data_to_send()
    assert send(session, PingReq(), 5) == []
    assert replies(session, 5) == [PingResp()]
    assert send(session, PubAck(4, 0x10), 5) == [PubAckReceived(4, 0x10)]
    assert send(session, Disconnect(0x04), 5) == [ConnectionTerminated(0x04, "client disconnected", by_peer=True)]
    assert session.data_to_send() == b""


def test_downlink_qos_follows_the_matching_subscription_else_1() -> None:
    session = new(4)
    send(session, Subscribe(1, (("v1/devices/me/attributes/response/+", 0),)), 4)
    session.data_to_send()
    assert session.publish("v1/devices/me/attributes/response/3", b"{}")
    assert session.publish("v1/devices/me/rpc/response/3", b"{}")
    assert session.publish("v1/devices/me/rpc/response/4", b"{}")
    assert replies(session, 4) == [
        Publish("v1/devices/me/attributes/response/3", b"{}", 0, 0),
        Publish("v1/devices/me/rpc/response/3", b"{}", 1, 1),
        Publish("v1/devices/me/rpc/response/4", b"{}", 1, 2),
    ]


def test_downlink_keeps_within_a_v5_client_receive_maximum() -> None:
    """MQTT 5 §3.3.4: no more unacknowledged QoS 1 PUBLISHes than the client's Receive Maximum; the rest
    wait, in order, for its PUBACKs (QoS 0 is not counted)."""
    session = Session(LIMITS, 0.0, topics.accept_filter)
    session.receive_data(encode(Connect("c", 5, username="T", properties={0x21: 2}), 5), 0.0)
    session.accept()
    session.data_to_send()
    send(session, Subscribe(1, (("v1/devices/me/attributes/response/+", 0),)), 5)
    session.data_to_send()
    for n in range(1, 5):
        assert session.publish(f"v1/devices/me/rpc/request/{n}", b"{}")
        assert session.last_packet_id == n
    assert session.publish("v1/devices/me/attributes/response/9", b"{}")  # QoS 0 by its subscription
    got = replies(session, 5)
    assert [(p.topic, p.packet_id) for p in got] == [  # type: ignore[attr-defined]
        ("v1/devices/me/rpc/request/1", 1),
        ("v1/devices/me/rpc/request/2", 2),
        ("v1/devices/me/attributes/response/9", 0),
    ]
    assert send(session, PubAck(2), 5) == [PubAckReceived(2, 0)]
    assert [p.packet_id for p in replies(session, 5)] == [3]  # type: ignore[attr-defined]
    send(session, PubAck(1), 5)
    send(session, PubAck(3), 5)
    assert [p.packet_id for p in replies(session, 5)] == [4]  # type: ignore[attr-defined]
    unlimited = new(5)  # no Receive Maximum given: nothing is held
    unlimited.data_to_send()
    for n in range(1, 5):
        unlimited.publish(f"v1/devices/me/rpc/request/{n}", b"{}")
    assert len(replies(unlimited, 5)) == 4


def test_downlink_respects_the_client_maximum_packet_size() -> None:
    session = Session(LIMITS, 0.0, topics.accept_filter)
    session.receive_data(encode(Connect("c", 5, properties={0x27: 40}), 5), 0.0)
    session.accept()
    session.data_to_send()
    assert not session.publish("v1/devices/me/rpc/response/1", b"x" * 40)
    assert session.publish("v1/devices/me/rpc/response/1", b"x")


def test_keepalive_is_enforced_at_one_and_a_half_times() -> None:
    session = new(5, keepalive=10)
    session.data_to_send()
    send(session, PingReq(), 5, now=100.0)
    assert session.deadline() == 115.0
    assert session.handle_timer(114.9) == []
    assert session.handle_timer(115.0) == [ConnectionTerminated(0x8D, "keep-alive expired")]
    assert replies(session, 5)[-1] == Disconnect(0x8D)
    assert session.deadline() is None


def test_keepalive_zero_means_no_deadline_and_connect_has_one() -> None:
    fresh = Session(LIMITS, 0.0, topics.accept_filter)
    assert fresh.deadline() == 5.0
    assert fresh.handle_timer(5.0)[0].reason_code == 0xA0  # type: ignore[union-attr]
    assert fresh.data_to_send() == b""
    assert new(4, keepalive=0).deadline() is None


@given(st.lists(st.integers(0, 200), max_size=8))
@settings(max_examples=200, deadline=None)
def test_any_chunking_gives_the_same_events_and_replies(cuts: list[int]) -> None:
    stream = b"".join(
        encode(p, 5)
        for p in (
            Connect("c", 5, keepalive_s=30, username="T"),
            Publish("v1/devices/me/telemetry", b'{"a":1}', 1, 1),
            Subscribe(2, (("v1/devices/me/rpc/request/+", 1), ("bad/#", 0))),
            PingReq(),
            Publish("v2/t", b"[]", 0),
            Disconnect(),
        )
    )
    cuts = sorted(c for c in cuts if c <= len(stream))
    session = Session(Limits(), 0.0, topics.accept_filter)
    events: list[object] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += session.receive_data(stream[start:end], 1.0)
        if session.state is State.AUTHENTICATING:
            events += session.accept()
    assert [type(e).__name__ for e in events] == [
        "ConnectReceived",
        "Publish",
        "Subscribed",
        "Publish",
        "ConnectionTerminated",
    ]
    assert [type(p).__name__ for p in replies(session, 5)] == ["ConnAck", "SubAck", "PingResp"]


# --- ack order ---------------------------------------------------------------------------------------


class FakeFuture:
    def __init__(self) -> None:
        self.value: object = None
        self.is_done = False

    def done(self) -> bool:
        return self.is_done

    def result(self) -> object:
        return self.value

    def resolve(self, value: object) -> None:
        self.value, self.is_done = value, True

    @classmethod
    def done_with(cls, value: object) -> FakeFuture:
        future = cls()
        future.resolve(value)
        return future


def test_ack_queue_keeps_arrival_order() -> None:
    queue = AckQueue()
    first, third = FakeFuture(), FakeFuture()
    queue.append((1, first, 0.1))
    queue.append((2, 0x90, 0.2))
    queue.append((3, third, 0.3))
    assert queue.ready() == []
    third.resolve("delivered")
    assert queue.ready() == []  # 3 is done but 1 is not
    first.resolve("queue_full")
    assert queue.ready() == [(1, "queue_full", 0.1), (2, 0x90, 0.2), (3, "delivered", 0.3)]
    assert len(queue) == 0


def _answers() -> st.SearchStrategy[object]:
    done = st.sampled_from(["delivered", "queue_full"]).map(lambda value: FakeFuture.done_with(value))
    return st.sampled_from([0, 0x90, -0x99, 0, 0]) | done | st.builds(FakeFuture)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 65535]), _answers(), st.floats(0, 10)), max_size=12))
def test_pop_delivered_in_c_is_the_python_reference(entries: list[tuple[int, object, float]]) -> None:
    """The run of plain successes at the head: the same ids, the same last time, the same rest, both ways."""
    assert session_module._acks_delivered is not None, "the C extension is built in this environment"
    in_c, in_python = AckQueue(entries), AckQueue(entries)
    c_answer = in_c.pop_delivered("delivered")
    c_function, session_module._acks_delivered = session_module._acks_delivered, None
    try:
        python_answer = in_python.pop_delivered("delivered")
    finally:
        session_module._acks_delivered = c_function
    assert c_answer == python_answer
    assert list(in_c) == list(in_python)
    expected = 0
    for packet_id, answer, _ in entries:
        success = answer == 0 if type(answer) is int else answer.is_done and answer.value == "delivered"  # type: ignore[attr-defined]
        if not packet_id or not success:
            break
        expected += 1
    assert len(c_answer[0]) == expected


# --- ThingsBoard topic tables -------------------------------------------------------------------------


ATTR_RES, RPC_RES = "v1/devices/me/attributes/response/", "v1/devices/me/rpc/response/"


@pytest.mark.parametrize(
    ("topic", "action", "kind", "request_id", "answer"),
    [
        ("v1/devices/me/telemetry", topics.Action.POST, RecordKind.TELEMETRY, 0, ""),
        ("v2/t", topics.Action.POST, RecordKind.TELEMETRY, 0, ""),
        ("v2/t/j", topics.Action.POST, RecordKind.TELEMETRY, 0, ""),
        ("v2/a", topics.Action.POST, RecordKind.ATTRIBUTES, 0, ""),
        ("v1/devices/me/claim", topics.Action.POST, RecordKind.CLAIM, 0, ""),
        ("v2/t/p", topics.Action.PROTOBUF, None, 0, ""),
        ("v1/devices/me/attributes/request/17", topics.Action.ATTRIBUTE_REQUEST, None, 17, ATTR_RES),
        ("v2/a/req/5", topics.Action.ATTRIBUTE_REQUEST, None, 5, "v2/a/res/"),
        ("v2/a/req/j/5", topics.Action.ATTRIBUTE_REQUEST, None, 5, "v2/a/res/j/"),
        ("v1/devices/me/rpc/request/1", topics.Action.CLIENT_RPC, None, 1, RPC_RES),
        ("v2/r/req/j/9", topics.Action.CLIENT_RPC, None, 9, "v2/r/res/j/"),
        ("v1/devices/me/rpc/response/4", topics.Action.RPC_RESPONSE, None, 4, ""),
        ("v1/devices/me/attributes/request/x1", topics.Action.ATTRIBUTE_REQUEST, None, -1, ATTR_RES),
        ("v1/devices/me/rpc/request/99999999999", topics.Action.CLIENT_RPC, None, -1, RPC_RES),
        ("v1/devices/me/telemetry/extra", topics.Action.UNKNOWN, None, 0, ""),
        ("v1/devices/me/attributes/request/", topics.Action.ATTRIBUTE_REQUEST, None, -1, ATTR_RES),
        ("v2/fw/request/1/chunk/0", topics.Action.UNKNOWN, None, 0, ""),
        ("/provision/request", topics.Action.UNKNOWN, None, 0, ""),
        ("v2/a/req/p/3", topics.Action.PROTOBUF, None, 0, ""),
    ],
)  # fmt: skip
def test_routes(topic: str, action: topics.Action, kind: object, request_id: int, answer: str) -> None:
    target = topics.route(topic, 64)
    assert (target.action, target.kind, target.request_id, target.response_prefix) == (
        action,
        kind,
        request_id,
        answer,
    )


def test_overlong_topic_is_unknown() -> None:
    assert topics.route("v1/devices/me/rpc/request/" + "1" * 100, 64).action is topics.Action.UNKNOWN


def test_topic_matching() -> None:
    assert topic_matches("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/5")
    assert not topic_matches("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/5/6")
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/+", "b/c")


@pytest.mark.parametrize(
    ("connect", "codes"),
    [
        (Connect("", username="bad"), (0x05, 0x86)),
        (Connect("", username="bad", password=b"x"), (0x05, 0x86)),
        (Connect("cid", password=b"x"), (0x05, 0x86)),
        (Connect("cid"), (0x02, 0x85)),
        (Connect(""), (0x05, 0x87)),
        (Connect("  "), (0x05, 0x87)),
    ],
)
def test_auth_refusal_codes_follow_thingsboard(connect: Connect, codes: tuple[int, int]) -> None:
    assert topics.auth_refusal(connect) == codes
    assert topics.auth_refusal(connect, unavailable=True) == (0x03, 0x88)


@pytest.mark.parametrize(
    ("payload", "keys"),
    [
        (b'{"clientKeys":"a,b","sharedKeys":"x"}', (["a", "b"], ["x"])),
        (b'{"sharedKeys":"x, y"}', (None, ["x", "y"])),
        (b"{}", (None, None)),
        (b'{"clientKeys":["a"]}', (["a"], None)),
        (b'{"clientKeys":5}', (["5"], None)),
    ],
)
def test_attribute_request_payloads(payload: bytes, keys: tuple[object, object]) -> None:
    assert topics.attribute_request(payload) == keys


@pytest.mark.parametrize("payload", [b"", b"[]", b"nope", b'{"clientKeys":["a","b"]}', b'{"clientKeys":{}}'])
def test_bad_attribute_request_payloads(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        topics.attribute_request(payload)


def test_client_rpc_payloads() -> None:
    assert topics.client_rpc(b'{"method":"getSessionLimits","params":{"timeout":5000}}') == (
        "getSessionLimits",
        {"timeout": 5000},
    )
    assert topics.client_rpc(b'{"method":"m"}') == ("m", None)
    for bad in (b"{}", b'{"method":1}', b"[1]", b""):
        with pytest.raises(PayloadError):
            topics.client_rpc(bad)
