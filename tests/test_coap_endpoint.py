"""Sans-IO CoAP endpoint with an explicit clock: messaging, de-duplication, piggyback/separate responses,
Block1/Block2, Observe, and bounded memory under floods."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    Block,
    Code,
    Message,
    Option,
    decode,
    decode_uint,
    encode,
    encode_uint,
)
from tb_gateway.coap.endpoint import (
    Endpoint,
    EndpointConfig,
    NotificationAcknowledged,
    NotificationTimedOut,
    ObservationCancelled,
    RequestReceived,
    ResponseTimedOut,
)

PEER = ("192.0.2.1", 40000)
PATH = ((Option.URI_PATH, b"api"), (Option.URI_PATH, b"v1"), (Option.URI_PATH, b"T"), (Option.URI_PATH, b"telemetry"))


def endpoint(**overrides) -> Endpoint:
    """rng 0 -> retransmission timeouts exactly ACK_TIMEOUT, 2x, 4x ...; message ids from 1000; expiry sweeps
    rare unless a test asks for them, so ``get_timer`` shows the protocol timers themselves."""
    overrides.setdefault("housekeeping_s", 1000.0)
    return Endpoint(EndpointConfig(**overrides), rng=lambda: 0.0, first_mid=1000)


def request(mtype=CON, code=Code.POST, mid=1, token=b"tk", options=PATH, payload=b'{"a":1}') -> bytes:
    return encode(Message(mtype, code, mid, token, options, payload))


def sent(ep: Endpoint) -> list[Message]:
    out = ep.datagrams_to_send(0.0)
    return [decode(data) for data, _ in out]


def only_request(events):
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    return events[0].exchange


# ---------------------------------------------------------------- requests and responses


def test_con_request_gets_piggybacked_response_in_the_ack():
    ep = endpoint()
    exchange = only_request(ep.receive_datagram(request(), PEER, 10.0))
    assert exchange.path == ("api", "v1", "T", "telemetry")
    assert exchange.payload == b'{"a":1}' and exchange.confirmable
    assert sent(ep) == []
    assert ep.get_timer() == pytest.approx(10.5)  # the piggyback window
    ep.respond(exchange, 10.1, Code.CREATED)
    assert sent(ep) == [Message(ACK, Code.CREATED, 1, b"tk")]
    with pytest.raises(ValueError):
        ep.respond(exchange, 10.1, Code.CREATED)


def test_retransmitted_con_is_answered_with_the_same_response_and_not_delivered_twice():
    ep = endpoint()
    exchange = only_request(ep.receive_datagram(request(mid=7), PEER, 0.0))
    assert ep.receive_datagram(request(mid=7), PEER, 0.1) == []  # duplicate while pending: silence
    assert sent(ep) == []
    ep.respond(exchange, 0.2, Code.CREATED)
    first = ep.datagrams_to_send(0.2)
    assert ep.receive_datagram(request(mid=7), PEER, 2.0) == []
    assert ep.datagrams_to_send(2.0) == first
    # same message id from another peer is another exchange
    assert isinstance(ep.receive_datagram(request(mid=7), ("192.0.2.2", 1), 2.0)[0], RequestReceived)


def test_duplicate_non_is_dropped_and_non_gets_a_non_response_with_a_new_mid():
    ep = endpoint()
    exchange = only_request(ep.receive_datagram(request(mtype=NON, mid=9), PEER, 0.0))
    assert ep.receive_datagram(request(mtype=NON, mid=9), PEER, 0.5) == []
    assert ep.get_timer() != pytest.approx(0.5)  # no piggyback window for NON
    ep.respond(exchange, 0.1, Code.CREATED)
    assert sent(ep) == [Message(NON, Code.CREATED, 1000, b"tk")]
    assert ep.receive_datagram(request(mtype=NON, mid=9), PEER, 1.0) == []
    assert sent(ep) == []


def test_slow_answer_gets_empty_ack_then_separate_con_response_retransmitted_until_acked():
    ep = endpoint()
    exchange = only_request(ep.receive_datagram(request(mid=5, token=b"ab"), PEER, 0.0))
    assert ep.handle_timer(0.4) == [] and sent(ep) == []
    assert ep.handle_timer(0.5) == []
    assert sent(ep) == [Message(ACK, Code.EMPTY, 5)]
    ep.receive_datagram(request(mid=5, token=b"ab"), PEER, 0.7)  # duplicate after the empty ACK
    assert sent(ep) == [Message(ACK, Code.EMPTY, 5)]
    ep.respond(exchange, 1.0, Code.CREATED)
    response = Message(CON, Code.CREATED, 1000, b"ab")
    assert sent(ep) == [response]
    assert ep.get_timer() == pytest.approx(3.0)  # ACK_TIMEOUT 2 s (random factor 0 here)
    ep.handle_timer(3.0)
    assert sent(ep) == [response]
    assert ep.get_timer() == pytest.approx(7.0)  # doubled
    # an ACK carrying a response code is not an acknowledgement of our CON: retransmissions go on
    assert ep.receive_datagram(encode(Message(ACK, Code.CONTENT, 1000, b"ab")), PEER, 3.5) == []
    assert ep.stats()["outgoing"] == 1
    assert ep.receive_datagram(encode(Message(ACK, Code.EMPTY, 1000, b"")), ("192.0.2.9", 1), 3.6) == []
    assert ep.stats()["outgoing"] == 1  # an ACK from another address does not match either
    assert ep.receive_datagram(encode(Message(ACK, Code.EMPTY, 1000)), PEER, 4.0) == []
    assert ep.handle_timer(7.0) == [] and sent(ep) == []
    assert ep.stats()["outgoing"] == 0


def test_separate_response_gives_up_after_max_retransmit():
    ep = endpoint()
    exchange = only_request(ep.receive_datagram(request(), PEER, 0.0))
    ep.handle_timer(0.5)
    ep.respond(exchange, 1.0, Code.CREATED)
    sent(ep)
    events, times = [], []
    while (when := ep.get_timer()) is not None and when < 200:
        times.append(round(when - 1.0, 3))
        events += ep.handle_timer(when)
    assert times[:5] == [2.0, 6.0, 14.0, 30.0, 62.0]  # 4 retransmissions, then the give-up at 62 s
    assert events == [ResponseTimedOut(exchange)]
    assert len(sent(ep)) == 4


def test_retransmission_timeout_is_randomized_between_ack_timeout_and_its_random_factor():
    ep = Endpoint(EndpointConfig(housekeeping_s=1000.0), rng=lambda: 1.0, first_mid=1)
    exchange = only_request(ep.receive_datagram(request(mtype=CON), PEER, 0.0))
    ep.handle_timer(0.5)
    ep.respond(exchange, 1.0, Code.CREATED)
    assert ep.get_timer() == pytest.approx(4.0)  # 1.0 + 2 s * 1.5


def test_ping_is_answered_with_reset_and_stray_messages_are_handled_per_rfc():
    ep = endpoint()
    assert ep.receive_datagram(encode(Message(CON, Code.EMPTY, 77)), PEER, 0.0) == []
    assert sent(ep) == [Message(RST, Code.EMPTY, 77)]
    # a response nobody asked for: CON -> RST, NON -> silence
    assert ep.receive_datagram(encode(Message(CON, Code.CONTENT, 78, b"x")), PEER, 0.0) == []
    assert sent(ep) == [Message(RST, Code.EMPTY, 78)]
    ep.receive_datagram(encode(Message(NON, Code.CONTENT, 79, b"x")), PEER, 0.0)
    ep.receive_datagram(encode(Message(NON, Code.EMPTY, 80)), PEER, 0.0)
    ep.receive_datagram(encode(Message(ACK, Code.EMPTY, 81)), PEER, 0.0)  # unknown ACK
    ep.receive_datagram(encode(Message(RST, Code.EMPTY, 82)), PEER, 0.0)  # unknown RST
    assert sent(ep) == []


def test_malformed_con_gets_reset_everything_else_malformed_is_ignored():
    ep = endpoint()
    assert ep.receive_datagram(bytes.fromhex("40010031f1"), PEER, 0.0) == []  # CON, option delta 15
    assert sent(ep) == [Message(RST, Code.EMPTY, 0x31)]
    for garbage in (b"", b"\x40", bytes.fromhex("80010001"), bytes.fromhex("50010032f1"), bytes.fromhex("7000003300")):
        assert ep.receive_datagram(garbage, PEER, 0.0) == []
    assert sent(ep) == []


def test_unknown_critical_option_is_4_02_for_con_and_dropped_for_non_elective_is_ignored():
    ep = endpoint()
    options = (*PATH, (2001, b"x"))  # odd -> critical
    assert ep.receive_datagram(request(options=options, mid=1), PEER, 0.0) == []
    assert sent(ep) == [Message(ACK, Code.BAD_OPTION, 1, b"tk")]
    assert ep.receive_datagram(request(mtype=NON, options=options, mid=2), PEER, 0.0) == []
    assert sent(ep) == []
    only_request(ep.receive_datagram(request(options=(*PATH, (2002, b"x")), mid=3), PEER, 0.0))


def test_dedup_entries_expire_after_exchange_lifetime():
    ep = endpoint(housekeeping_s=1.0)
    exchange = only_request(ep.receive_datagram(request(mid=3), PEER, 0.0))
    ep.respond(exchange, 0.0, Code.CREATED)
    sent(ep)
    assert ep.receive_datagram(request(mid=3), PEER, 246.0) == []
    assert sent(ep) == [Message(ACK, Code.CREATED, 3, b"tk")]
    ep.handle_timer(248.0)
    assert ep.stats()["exchanges"] == 0
    only_request(ep.receive_datagram(request(mid=3), PEER, 248.5))  # a new exchange now


def test_memory_is_bounded_under_a_flood_of_message_ids_tokens_and_addresses():
    ep = endpoint(max_exchanges=500, max_block_transfers=20, max_observations=50)
    now = 0.0
    for i in range(20_000):
        addr = (f"10.0.{i % 251}.{i % 13}", 1024 + i)
        token = i.to_bytes(4, "big")
        mtype = CON if i % 2 else NON
        block = ((Option.BLOCK1, Block(0, True, 2).encode()),) if i % 5 == 0 else ()
        observe = ((Option.OBSERVE, b""),) if i % 7 == 0 else ()
        code = Code.GET if observe else Code.POST
        payload = b"p" * 64 if block else b"x"
        events = ep.receive_datagram(
            request(
                mtype=mtype, code=code, mid=i & 0xFFFF, token=token, options=(*PATH, *block, *observe), payload=payload
            ),
            addr,
            now,
        )
        for event in events:
            if observe:
                ep.observe(event.exchange)
            if i % 3:  # leave a third unanswered for now
                ep.respond(event.exchange, now, Code.CREATED)
        ep.datagrams_to_send(now)
        now += 0.001
    stats = ep.stats()
    assert stats["exchanges"] <= 500
    assert stats["block_transfers"] <= 20
    assert stats["observations"] <= 50
    # unanswered CONs went over to separate responses at their deadline and left the piggyback queue
    while (when := ep.get_timer()) is not None and when < now + 1:
        ep.handle_timer(when)
    assert ep.stats()["piggyback_pending"] == 0


# ---------------------------------------------------------------- Block1 / Block2


def block_request(num: int, more: bool, payload: bytes, mid: int, szx: int = 3, extra=()) -> bytes:
    options = (*PATH, (Option.BLOCK1, Block(num, more, szx).encode()), *extra)
    return request(mid=mid, token=bytes([mid & 255]), options=options, payload=payload)


def test_block1_upload_rfc7959_figure_11():
    ep = endpoint()
    body = bytes(range(256)) + b"tail"
    assert ep.receive_datagram(block_request(0, True, body[:128], 1234), PEER, 0.0) == []
    assert sent(ep) == [Message(ACK, Code.CONTINUE, 1234, bytes([1234 & 255]), ((Option.BLOCK1, b"\x0b"),))]
    assert ep.receive_datagram(block_request(1, True, body[128:256], 1235), PEER, 0.1) == []
    assert sent(ep)[0].options == ((Option.BLOCK1, b"\x1b"),)
    exchange = only_request(ep.receive_datagram(block_request(2, False, body[256:], 1236), PEER, 0.2))
    assert exchange.payload == body
    ep.respond(exchange, 0.3, Code.CHANGED)
    assert sent(ep) == [Message(ACK, Code.CHANGED, 1236, bytes([1236 & 255]), ((Option.BLOCK1, b"\x23"),))]
    assert ep.stats()["block_transfers"] == 0


def test_block1_retransmitted_block_is_answered_from_the_dedup_cache():
    ep = endpoint()
    ep.receive_datagram(block_request(0, True, b"a" * 128, 1), PEER, 0.0)
    first = ep.datagrams_to_send(0.0)
    ep.receive_datagram(block_request(0, True, b"a" * 128, 1), PEER, 0.5)
    assert ep.datagrams_to_send(0.5) == first
    exchange = only_request(ep.receive_datagram(block_request(1, False, b"b", 2), PEER, 0.6))
    assert exchange.payload == b"a" * 128 + b"b"


def test_block1_errors_out_of_order_wrong_size_too_large():
    ep = endpoint(max_body_bytes=300)
    assert ep.receive_datagram(block_request(1, True, b"a" * 128, 1), PEER, 0.0) == []
    assert sent(ep)[0].code == Code.REQUEST_ENTITY_INCOMPLETE
    ep.receive_datagram(block_request(0, True, b"a" * 100, 2), PEER, 0.0)  # non-final block of the wrong size
    assert sent(ep)[0].code == Code.BAD_REQUEST
    for mid, num in ((3, 0), (4, 1)):
        ep.receive_datagram(block_request(num, True, b"a" * 128, mid), PEER, 0.0)
        assert sent(ep)[0].code == Code.CONTINUE
    ep.receive_datagram(block_request(2, True, b"a" * 128, 5), PEER, 0.0)
    [too_large] = sent(ep)
    assert too_large.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert decode_uint(too_large.option(Option.SIZE1)) == 300
    assert ep.stats()["block_transfers"] == 0
    # Size1 announcing too much is refused on the first block
    ep.receive_datagram(block_request(0, True, b"a" * 128, 6, extra=((Option.SIZE1, encode_uint(5000)),)), PEER, 0.0)
    assert sent(ep)[0].code == Code.REQUEST_ENTITY_TOO_LARGE
    # a BERT block option is a bad option
    options = (*PATH, (Option.BLOCK1, b"\x0f"))
    ep.receive_datagram(request(mid=7, options=options), PEER, 0.0)
    assert sent(ep)[0].code == Code.BAD_OPTION


def test_abandoned_block1_transfer_expires():
    ep = endpoint(block_lifetime_s=10.0, housekeeping_s=1.0)
    ep.receive_datagram(block_request(0, True, b"a" * 128, 1), PEER, 0.0)
    assert ep.stats()["block_transfers"] == 1
    ep.handle_timer(11.0)
    assert ep.stats()["block_transfers"] == 0
    ep.receive_datagram(block_request(1, False, b"b", 2), PEER, 11.0)
    assert sent(ep)[-1].code == Code.REQUEST_ENTITY_INCOMPLETE


def test_block2_slices_a_large_response_and_serves_the_block_asked_for():
    ep = endpoint()
    body = bytes(range(256)) * 10  # 2560 bytes -> three 1024-byte blocks
    exchange = only_request(ep.receive_datagram(request(code=Code.GET, payload=b""), PEER, 0.0))
    ep.respond(exchange, 0.0, Code.CONTENT, body)
    [first] = sent(ep)
    assert first.payload == body[:1024]
    assert Block.decode(first.option(Option.BLOCK2)) == Block(0, True, 6)
    assert decode_uint(first.option(Option.SIZE2)) == 2560
    options = (*PATH, (Option.BLOCK2, Block(2, False, 6).encode()))
    exchange = only_request(ep.receive_datagram(request(mid=2, code=Code.GET, options=options, payload=b""), PEER, 0.1))
    ep.respond(exchange, 0.1, Code.CONTENT, body)
    [last] = sent(ep)
    assert last.payload == body[2048:]
    assert Block.decode(last.option(Option.BLOCK2)) == Block(2, False, 6)


# ---------------------------------------------------------------- Observe


def register(ep: Endpoint, mtype=CON, token=b"\x4a", mid=1, now=0.0):
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"temperature"))
    exchange = only_request(
        ep.receive_datagram(
            request(mtype=mtype, code=Code.GET, mid=mid, token=token, options=options, payload=b""), PEER, now
        )
    )
    assert exchange.observe == 0
    observation = ep.observe(exchange)
    assert observation is not None
    ep.respond(exchange, now, Code.CONTENT, b"22.9 Cel")
    return observation, sent(ep)


def test_observe_registration_and_notifications_rfc7641_figure_2():
    ep = endpoint()
    observation, [response] = register(ep)
    assert response.type == ACK and response.token == b"\x4a"
    first_seq = decode_uint(response.option(Option.OBSERVE))
    assert observation.path == ("temperature",)
    assert ep.notify(observation, 1.0, Code.CONTENT, b"22.8 Cel") == 1000
    [notification] = sent(ep)
    assert notification.type == CON and notification.token == b"\x4a" and notification.payload == b"22.8 Cel"
    second_seq = decode_uint(notification.option(Option.OBSERVE))
    assert second_seq > first_seq
    events = ep.receive_datagram(encode(Message(ACK, Code.EMPTY, 1000)), PEER, 1.1)
    assert events == [NotificationAcknowledged(observation, 1000)]
    ep.notify(observation, 2.0, Code.CONTENT, b"23.0 Cel", confirmable=False)
    [non] = sent(ep)
    assert non.type == NON and decode_uint(non.option(Option.OBSERVE)) > second_seq


def test_non_registration_gets_non_notifications_and_reset_deregisters():
    ep = endpoint()
    observation, [response] = register(ep, mtype=NON)
    assert response.type == NON
    mid = ep.notify(observation, 1.0, Code.CONTENT, b"x")
    assert sent(ep)[0].type == NON
    events = ep.receive_datagram(encode(Message(RST, Code.EMPTY, mid)), PEER, 1.5)
    assert events == [ObservationCancelled(observation, "reset")]
    assert not observation.active and ep.stats()["observations"] == 0
    with pytest.raises(ValueError):
        ep.notify(observation, 2.0, Code.CONTENT)


def test_reset_of_a_con_notification_deregisters():
    ep = endpoint()
    observation, _ = register(ep)
    mid = ep.notify(observation, 1.0, Code.CONTENT, b"x")
    events = ep.receive_datagram(encode(Message(RST, Code.EMPTY, mid)), PEER, 1.5)
    assert events == [ObservationCancelled(observation, "reset")]
    assert ep.handle_timer(10.0) == [] and sent(ep)[1:] == []


def test_get_with_observe_1_deregisters_and_is_still_a_request():
    ep = endpoint()
    observation, _ = register(ep)
    options = ((Option.OBSERVE, b"\x01"), (Option.URI_PATH, b"temperature"))
    events = ep.receive_datagram(request(code=Code.GET, mid=9, token=b"\x4a", options=options, payload=b""), PEER, 5.0)
    assert events[0] == ObservationCancelled(observation, "deregistered")
    assert isinstance(events[1], RequestReceived) and events[1].exchange.observe == 1
    assert list(ep.observations()) == []


def test_con_notification_is_retransmitted_then_times_out_and_cancels():
    ep = endpoint()
    observation, _ = register(ep)
    mid = ep.notify(observation, 0.0, Code.CONTENT, b"x")
    [notification] = sent(ep)
    events = []
    while (when := ep.get_timer()) is not None and when < 100:
        events += ep.handle_timer(when)
    assert sent(ep) == [notification] * 4
    assert events == [NotificationTimedOut(observation, mid), ObservationCancelled(observation, "timeout")]
    assert not observation.active


def test_reregistration_with_same_token_replaces_and_keeps_sequence_increasing():
    ep = endpoint()
    first, [r1] = register(ep, mid=1)
    second, [r2] = register(ep, mid=2, now=1.0)
    assert first is second and len(list(ep.observations())) == 1
    assert decode_uint(r2.option(Option.OBSERVE)) > decode_uint(r1.option(Option.OBSERVE))


def test_only_an_unanswered_get_with_observe_0_can_register():
    ep = endpoint()
    plain = only_request(ep.receive_datagram(request(code=Code.GET, mid=1, payload=b""), PEER, 0.0))
    with pytest.raises(ValueError):
        ep.observe(plain)
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"t"))
    exchange = only_request(ep.receive_datagram(request(code=Code.GET, mid=2, options=options), PEER, 0.0))
    ep.respond(exchange, 0.0, Code.CONTENT)
    with pytest.raises(ValueError):
        ep.observe(exchange)


def test_notifications_in_flight_are_capped_and_observers_are_capped():
    ep = endpoint(max_notifications_in_flight=2, max_observations=1)
    observation, _ = register(ep)
    assert ep.notify(observation, 0.0, Code.CONTENT) is not None
    assert ep.notify(observation, 0.0, Code.CONTENT) is not None
    assert ep.notify(observation, 0.0, Code.CONTENT) is None
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"other"))
    exchange = only_request(
        ep.receive_datagram(request(code=Code.GET, mid=50, token=b"zz", options=options), PEER, 0.0)
    )
    assert ep.observe(exchange) is None
    ep.respond(exchange, 0.0, Code.CONTENT, b"v")
    response = next(m for m in sent(ep) if m.mid == 50)
    assert response.option(Option.OBSERVE) is None  # not registered, and the client can tell


# ---------------------------------------------------------------- robustness


@settings(max_examples=500)
@given(
    st.lists(
        st.binary(max_size=40)
        | st.builds(request, mtype=st.integers(0, 3), code=st.integers(0, 255), mid=st.integers(0, 5)),
        max_size=20,
    )
)
def test_no_datagram_sequence_makes_the_endpoint_raise(datagrams):
    ep = endpoint()
    now = 0.0
    for data in datagrams:
        for event in ep.receive_datagram(data, PEER, now):
            if isinstance(event, RequestReceived) and event.exchange.state == 0:
                ep.respond(event.exchange, now, Code.CREATED)
        for out, addr in ep.datagrams_to_send(now):
            assert addr == PEER
            decode(out)
        now += 0.3
        if (when := ep.get_timer()) is not None and when <= now:
            ep.handle_timer(now)
