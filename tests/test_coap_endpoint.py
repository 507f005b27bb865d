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
    RequestRefused,
    ResponseTimedOut,
)
from tb_gateway.coap.expiring import ExpiringMap, PeerWindowedMap

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


def refused(events) -> list[str]:
    """The reasons of the endpoint's own refusals (the adapter counts them); nothing else may be reported."""
    assert all(isinstance(event, RequestRefused) for event in events), events
    return [event.reason for event in events]


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
    assert refused(ep.receive_datagram(request(options=options, mid=1), PEER, 0.0)) == ["bad_option"]
    assert sent(ep) == [Message(ACK, Code.BAD_OPTION, 1, b"tk")]
    assert refused(ep.receive_datagram(request(mtype=NON, options=options, mid=2), PEER, 0.0)) == ["bad_option"]
    assert sent(ep) == []
    only_request(ep.receive_datagram(request(options=(*PATH, (2002, b"x")), mid=3), PEER, 0.0))


@pytest.mark.parametrize(
    ("options", "code", "reason"),
    [
        # RFC 7252 §5.4.5: a repeated non-repeatable critical option is unrecognized -> 4.02
        (((Option.URI_PORT, b"\x16\x33"), (Option.URI_PORT, b"\x16\x34")), Code.BAD_OPTION, "bad_option"),
        (((Option.URI_HOST, b"a"), (Option.URI_HOST, b"b")), Code.BAD_OPTION, "bad_option"),
        (((Option.ACCEPT, b"\x32"), (Option.ACCEPT, b"\x32")), Code.BAD_OPTION, "bad_option"),
        (((Option.BLOCK1, b"\x06"), (Option.BLOCK1, b"\x06")), Code.BAD_OPTION, "bad_option"),
        # §5.7.2: no proxying here
        (((Option.PROXY_URI, b"coap://elsewhere/x"),), Code.PROXYING_NOT_SUPPORTED, "proxying_not_supported"),
        (((Option.PROXY_SCHEME, b"coap"),), Code.PROXYING_NOT_SUPPORTED, "proxying_not_supported"),
        # RFC 7959 §2.2: SZX 7 is 4.00; a block value over 3 bytes is outside its length range (§5.4.3)
        (((Option.BLOCK1, b"\x07"),), Code.BAD_REQUEST, "bad_request"),
        (((Option.BLOCK2, b"\x07"),), Code.BAD_REQUEST, "bad_request"),
        (((Option.BLOCK2, b"\x00\x00\x00\x06"),), Code.BAD_OPTION, "bad_option"),
    ],
)
def test_option_rules_repeated_critical_proxy_and_block_szx_7(options, code, reason):
    ep = endpoint()
    assert refused(ep.receive_datagram(request(options=(*PATH, *options)), PEER, 0.0)) == [reason]
    assert [(m.type, m.code) for m in sent(ep)] == [(ACK, code)]
    assert ep.stats()["block_transfers"] == 0


def test_a_repeated_elective_option_is_ignored_after_its_first_occurrence():
    ep = endpoint()
    json, text = encode_uint(50), encode_uint(0)
    options = (*PATH, (Option.CONTENT_FORMAT, json), (Option.CONTENT_FORMAT, text), (Option.SIZE1, b"\x01"))
    exchange = only_request(ep.receive_datagram(request(options=(*options, (Option.SIZE1, b"\x02"))), PEER, 0.0))
    assert exchange.uint_option(Option.CONTENT_FORMAT) == 50 and exchange.uint_option(Option.SIZE1) == 1


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


def test_a_non_after_a_con_is_remembered_for_non_lifetime_not_exchange_lifetime():
    ep = endpoint(housekeeping_s=1.0)
    con = only_request(ep.receive_datagram(request(mid=1), PEER, 0.0))
    ep.respond(con, 0.0, Code.CREATED)
    non = only_request(ep.receive_datagram(request(mtype=NON, mid=2), PEER, 1.0))
    ep.respond(non, 1.0, Code.CREATED)
    sent(ep)
    ep.handle_timer(146.5)  # the NON's 145 s are over, the CON's 247 s are not
    assert ep.stats()["exchanges"] == 1
    only_request(ep.receive_datagram(request(mtype=NON, mid=2), PEER, 146.6))  # a new message, not a duplicate
    assert ep.receive_datagram(request(mid=1), PEER, 146.7) == []  # the CON is still a duplicate
    assert sent(ep) == [Message(ACK, Code.CREATED, 1, b"tk")]


def test_expiring_map_keeps_each_lifetime_and_drops_the_first_to_expire_at_its_cap():
    table: ExpiringMap[str, int] = ExpiringMap(2)
    table.put("long", 1, 0.0, 247.0)
    table.put("short", 2, 1.0, 145.0)
    table.expire(146.0)
    assert (table.get("long"), table.get("short")) == (1, None)
    table.put("short", 3, 150.0, 145.0)
    table.put("third", 4, 151.0, 247.0)  # at the cap: "long" expires first (247 < 295)
    assert (table.get("long"), table.get("short"), table.get("third")) == (None, 3, 4)
    for i in range(100):  # overwrites leave stale queue entries; the queues are compacted
        table.put("short", i, 152.0 + i, 145.0)
    assert len(table) == 2 and table.get("short") == 99
    assert sum(len(queue) for queue in table._queues.values()) <= 5
    table.expire(1000.0)
    assert len(table) == 0


def test_a_peer_keeps_only_its_newest_entries_and_an_emptied_window_goes():
    table: PeerWindowedMap[str, int] = PeerWindowedMap(100, 3)
    for mid in range(5):
        table.put(("a", mid), mid, float(mid), 247.0)
    table.put(("b", 0), 10, 5.0, 145.0)
    assert [table.get(("a", mid)) for mid in range(5)] == [None, None, 2, 3, 4]  # a's oldest two went, early
    assert table.get(("b", 0)) == 10  # another peer's entries are untouched
    assert [entry[1] for entry in table._windows["a"]] == [("a", 2), ("a", 3), ("a", 4)]
    table.pop(("a", 3))  # stale inside the window until it reaches the front
    table.put(("a", 5), 5, 6.0, 247.0)
    assert [table.get(("a", mid)) for mid in (2, 4, 5)] == [None, 4, 5]
    assert [entry[1] for entry in table._windows["a"]] == [("a", 4), ("a", 5)]
    table.expire(151.0)  # b's NON expired: its window goes with it (peers come and go)
    assert "b" not in table._windows and len(table) == 2
    table.put(("a", 4), 40, 200.0, 247.0)  # overwritten: the older window entry is stale
    table.expire(254.0)  # (a, 5) expired at 253, the stale (a, 4) of 251 goes with it; (a, 4) lives to 447
    assert table.get(("a", 4)) == 40 and [entry[1] for entry in table._windows["a"]] == [("a", 4)]
    table.expire(447.0)
    assert len(table) == 0 and table._windows == {}


def test_a_windowed_map_at_its_cap_drops_the_first_to_expire_and_keeps_the_windows_in_step():
    table: PeerWindowedMap[str, int] = PeerWindowedMap(4, 64)
    for n in range(40):  # many peers, one entry each: the cap, not the windows, bounds the map
        table.put((f"peer-{n}", 1), n, float(n), 247.0)
    assert len(table) == 4 and sorted(table._windows) == ["peer-36", "peer-37", "peer-38", "peer-39"]
    assert sum(len(queue) for queue in table._queues.values()) <= 2 * 4 + 4 // 8 + 1
    zero = PeerWindowedMap[str, int](100, 0)  # 0: no per-peer bound
    for mid in range(10):
        zero.put(("a", mid), mid, 0.0, 1.0)
    assert len(zero) == 10 and zero._windows == {}


def test_a_retransmission_of_a_message_older_than_the_peer_window_is_taken_again():
    """Californium's per-peer de-duplication: a device retransmits only its latest messages (NSTART 1)."""
    ep = endpoint(exchanges_per_peer=2)
    for mid in (1, 2, 3):
        ep.respond(only_request(ep.receive_datagram(request(mid=mid), PEER, 0.0)), 0.0, Code.CREATED)
    ep.datagrams_to_send(0.0)
    assert ep.receive_datagram(request(mid=3), PEER, 2.0) == []  # the newest two are duplicates still
    assert ep.receive_datagram(request(mid=2), PEER, 2.0) == []
    assert sent(ep) == [Message(ACK, Code.CREATED, 3, b"tk"), Message(ACK, Code.CREATED, 2, b"tk")]
    only_request(ep.receive_datagram(request(mid=1), PEER, 2.0))  # forgotten: a new request (at least once)
    assert ep.stats()["exchanges"] == 2


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
    table = ep._seen  # 20,000 addresses, but a peer's window goes with its last entry; stale queue entries
    peers, queued = (  # are bounded (the C table, or the Python one when built without a compiler)
        (table.stats()["peers"], table.stats()["queued"])
        if not isinstance(table, PeerWindowedMap)
        else (len(table._windows), sum(len(queue) for queue in table._queues.values()))
    )
    assert peers <= 500
    assert queued <= 2 * 500 + 500 // 8 + 2
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
    assert refused(ep.receive_datagram(block_request(1, True, b"a" * 128, 1), PEER, 0.0)) == ["incomplete"]
    assert sent(ep)[0].code == Code.REQUEST_ENTITY_INCOMPLETE
    wrong_size = ep.receive_datagram(block_request(0, True, b"a" * 100, 2), PEER, 0.0)  # a non-final block
    assert refused(wrong_size) == ["bad_request"]
    assert sent(ep)[0].code == Code.BAD_REQUEST
    for mid, num in ((3, 0), (4, 1)):
        ep.receive_datagram(block_request(num, True, b"a" * 128, mid), PEER, 0.0)
        assert sent(ep)[0].code == Code.CONTINUE
    assert refused(ep.receive_datagram(block_request(2, True, b"a" * 128, 5), PEER, 0.0)) == ["too_large"]
    [too_large] = sent(ep)
    assert too_large.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert decode_uint(too_large.option(Option.SIZE1)) == 300
    assert ep.stats()["block_transfers"] == 0
    # Size1 announcing too much is refused on the first block
    announced = block_request(0, True, b"a" * 128, 6, extra=((Option.SIZE1, encode_uint(5000)),))
    assert refused(ep.receive_datagram(announced, PEER, 0.0)) == ["too_large"]
    assert sent(ep)[0].code == Code.REQUEST_ENTITY_TOO_LARGE
    # a BERT block size is a bad request (RFC 7959 §2.2)
    options = (*PATH, (Option.BLOCK1, b"\x0f"))
    assert refused(ep.receive_datagram(request(mid=7, options=options), PEER, 0.0)) == ["bad_request"]
    assert sent(ep)[0].code == Code.BAD_REQUEST


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
    # another client (no body kept for it) asks for block 2: the application answers, the endpoint slices
    other = ("192.0.2.2", 40000)
    options = (*PATH, (Option.BLOCK2, Block(2, False, 6).encode()))
    exchange = only_request(
        ep.receive_datagram(request(mid=2, code=Code.GET, options=options, payload=b""), other, 0.1)
    )
    ep.respond(exchange, 0.1, Code.CONTENT, body)
    [last] = sent(ep)
    assert last.payload == body[2048:]
    assert Block.decode(last.option(Option.BLOCK2)) == Block(2, False, 6)


def test_later_blocks_come_from_the_body_sent_in_block_0_with_its_etag():
    """RFC 7959 §2.4: the representation may change between block requests; the client must get the blocks of
    one body, with an ETag to tell a newer one."""
    ep = endpoint(block_lifetime_s=60.0, housekeeping_s=1.0)
    body = b"a" * 1024 + b"b" * 100
    exchange = only_request(ep.receive_datagram(request(code=Code.GET, payload=b""), PEER, 0.0))
    ep.respond(exchange, 0.0, Code.CONTENT, body, ((Option.CONTENT_FORMAT, encode_uint(50)),))
    [first] = sent(ep)
    etag = first.option(Option.ETAG)
    assert etag is not None and first.payload == body[:1024]
    options = (*PATH, (Option.BLOCK2, Block(1, False, 6).encode()))
    assert ep.receive_datagram(request(mid=2, code=Code.GET, options=options, payload=b""), PEER, 1.0) == []
    [second] = sent(ep)
    assert (second.code, second.payload, second.option(Option.ETAG)) == (Code.CONTENT, b"b" * 100, etag)
    assert Block.decode(second.option(Option.BLOCK2)) == Block(1, False, 6)
    assert decode_uint(second.option(Option.CONTENT_FORMAT)) == 50
    ep.handle_timer(61.5)  # kept for block_lifetime_s, then the application is asked again
    assert ep.stats()["kept_bodies"] == 0
    only_request(ep.receive_datagram(request(mid=3, code=Code.GET, options=options, payload=b""), PEER, 62.0))


def test_a_large_notification_goes_out_as_block_0_and_the_rest_from_the_same_body():
    """RFC 7959 §3.4 / RFC 7641 §3.4: the registration response and each notification are sent in blocks;
    the client GETs the later blocks without Observe."""
    ep = endpoint()
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"attributes"))
    get = request(code=Code.GET, token=b"\x4a", options=options, payload=b"")
    exchange = only_request(ep.receive_datagram(get, PEER, 0.0))
    observation = ep.observe(exchange)
    assert observation is not None
    snapshot = b'{"k":"' + b"s" * 1500 + b'"}'
    ep.respond(exchange, 0.0, Code.CONTENT, snapshot)
    [response] = sent(ep)
    assert response.option(Option.OBSERVE) is not None and response.payload == snapshot[:1024]
    follow = ((Option.URI_PATH, b"attributes"), (Option.BLOCK2, Block(1, False, 6).encode()))
    assert (
        ep.receive_datagram(request(code=Code.GET, mid=2, token=b"\x4b", options=follow, payload=b""), PEER, 0.1) == []
    )
    [rest] = sent(ep)
    assert response.payload + rest.payload == snapshot and rest.option(Option.OBSERVE) is None
    assert rest.option(Option.ETAG) == response.option(Option.ETAG)
    update = b'{"k":"' + b"u" * 70_000 + b'"}'  # over 64 KiB: could never go out in one datagram
    ep.notify(observation, 1.0, Code.CONTENT, update)
    [notification] = sent(ep)
    assert len(notification.payload) == 1024 and notification.option(Option.OBSERVE) is not None
    assert decode_uint(notification.option(Option.SIZE2)) == len(update)
    assert notification.option(Option.ETAG) != response.option(Option.ETAG)
    body, num, more = notification.payload, 1, True
    while more:
        follow = ((Option.URI_PATH, b"attributes"), (Option.BLOCK2, Block(num, False, 6).encode()))
        ep.receive_datagram(request(code=Code.GET, mid=10 + num, options=follow, payload=b""), PEER, 1.1)
        [block] = sent(ep)
        assert block.option(Option.ETAG) == notification.option(Option.ETAG)
        body += block.payload
        more, num = Block.decode(block.option(Option.BLOCK2)).more, num + 1
    assert body == update


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


def test_observe_1_is_read_as_a_uint_so_a_non_minimal_0x0001_deregisters_too():
    ep = endpoint()
    observation, _ = register(ep)
    options = ((Option.OBSERVE, b"\x00\x01"), (Option.URI_PATH, b"temperature"))
    events = ep.receive_datagram(request(code=Code.GET, mid=9, token=b"\x4a", options=options, payload=b""), PEER, 5.0)
    assert events[0] == ObservationCancelled(observation, "deregistered")
    assert not observation.active and list(ep.observations()) == []


def test_deregistration_refused_for_an_unknown_critical_option_leaves_the_observation():
    """RFC 7252 §5.4.1: the request is rejected, so it has no effect (the adapter would never hear of it)."""
    ep = endpoint()
    observation, _ = register(ep)
    options = ((Option.OBSERVE, b"\x01"), (Option.URI_PATH, b"temperature"), (9, b""))
    events = ep.receive_datagram(request(code=Code.GET, mid=9, token=b"\x4a", options=options, payload=b""), PEER, 5.0)
    assert refused(events) == ["bad_option"]
    assert [m.code for m in sent(ep)] == [Code.BAD_OPTION]
    assert observation.active and list(ep.observations()) == [observation]


def test_reset_of_a_non_registration_response_deregisters():
    """RFC 7641 §3.6: the registration response counts as a notification."""
    ep = endpoint()
    observation, [response] = register(ep, mtype=NON)
    assert response.type == NON and response.option(Option.OBSERVE) is not None
    events = ep.receive_datagram(encode(Message(RST, Code.EMPTY, response.mid)), PEER, 0.5)
    assert events == [ObservationCancelled(observation, "reset")]
    assert not observation.active


def test_reset_of_a_separate_registration_response_deregisters():
    ep = endpoint()
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"temperature"))
    get = request(code=Code.GET, token=b"\x4a", options=options, payload=b"")
    exchange = only_request(ep.receive_datagram(get, PEER, 0.0))
    ep.handle_timer(1.0)  # the piggyback window is over: empty ACK now, the response later as a CON
    observation = ep.observe(exchange)
    assert observation is not None
    ep.respond(exchange, 1.0, Code.CONTENT, b"v")
    [_, response] = sent(ep)
    assert response.type == CON
    events = ep.receive_datagram(encode(Message(RST, Code.EMPTY, response.mid)), PEER, 1.5)
    assert events == [ObservationCancelled(observation, "reset")]


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


def test_registration_with_same_token_for_another_resource_replaces_the_old_observation():
    """RFC 7641 §4.1: the token names one observation; a registration for another resource (another device's
    path, another feature) ends the old one instead of taking over its notifications."""
    ep = endpoint()
    first, [r1] = register(ep, mid=1)
    assert ep.notify(first, 0.5, Code.CONTENT, b"x") is not None
    sent(ep)
    options = ((Option.OBSERVE, b""), (Option.URI_PATH, b"humidity"))
    get = request(code=Code.GET, mid=2, token=b"\x4a", options=options, payload=b"")
    exchange = only_request(ep.receive_datagram(get, PEER, 1.0))
    assert ep.observation(PEER, b"\x4a") is first
    second = ep.observe(exchange)
    assert second is not None and second is not first
    assert not first.active and second.active and second.path == ("humidity",)
    assert list(ep.observations()) == [second] and ep.observation(PEER, b"\x4a") is second
    ep.respond(exchange, 1.0, Code.CONTENT, b"40 %")
    [r2] = sent(ep)
    assert decode_uint(r2.option(Option.OBSERVE)) > decode_uint(r1.option(Option.OBSERVE))
    assert ep.handle_timer(100.0) == [] and sent(ep) == []  # the old one's notification is not retransmitted


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


def test_an_observer_silent_for_a_day_is_pinged_and_a_reset_keeps_it():
    """RFC 7252 §4.3: an empty CON asks "are you there"; any CoAP endpoint answers it with a RST."""
    ep = endpoint(observer_check_s=100.0)
    observation, _ = register(ep, now=0.0)
    assert ep.get_timer() == pytest.approx(100.0)
    assert ep.handle_timer(100.0) == []
    [ping] = sent(ep)
    assert (ping.type, ping.code, ping.token, ping.payload) == (CON, Code.EMPTY, b"", b"")
    assert ep.receive_datagram(encode(Message(RST, Code.EMPTY, ping.mid)), PEER, 101.0) == []
    assert observation.active and ep.stats()["observations"] == 1
    assert ep.handle_timer(150.0) == [] and sent(ep) == []  # answered: no retransmission
    assert ep.get_timer() == pytest.approx(200.0)  # the next check, a period after the ping
    assert ep.handle_timer(200.0) == [] and sent(ep) == []  # heard at 101 (the RST): due at 201
    ep.handle_timer(201.0)
    [again] = sent(ep)
    assert again.code == Code.EMPTY and again.mid != ping.mid
    assert ep.receive_datagram(encode(Message(ACK, Code.EMPTY, again.mid)), PEER, 200.5) == []  # ACK: alive too
    assert observation.active


def test_an_observer_that_vanished_is_dropped_after_the_ping_s_retransmissions():
    ep = endpoint(observer_check_s=100.0)
    observation, _ = register(ep, now=0.0)
    ep.handle_timer(100.0)
    [ping] = sent(ep)
    events: list[object] = []
    now = 100.0
    while (when := ep.get_timer()) is not None and when < 400.0:
        now = when
        events += ep.handle_timer(now)
        for message in sent(ep):
            assert message.mid == ping.mid and message.code == Code.EMPTY  # the same ping, retransmitted
    assert events == [ObservationCancelled(observation, "timeout")]
    assert now == pytest.approx(100.0 + 2.0 * (1 + 2 + 4 + 8 + 16))  # MAX_RETRANSMIT 4: 62 s later
    assert not observation.active and ep.stats()["observations"] == 0 and ep.stats()["outgoing"] == 0


def test_an_acknowledged_notification_or_one_in_flight_postpones_the_ping():
    ep = endpoint(observer_check_s=100.0)
    observation, _ = register(ep, now=0.0)
    mid = ep.notify(observation, 50.0, Code.CONTENT, b"x")
    sent(ep)
    ep.receive_datagram(encode(Message(ACK, Code.EMPTY, mid)), PEER, 60.0)
    assert ep.handle_timer(100.0) == [] and sent(ep) == []  # heard at 60: due at 160
    assert ep.get_timer() == pytest.approx(160.0)
    ep.notify(observation, 159.0, Code.CONTENT, b"y")  # unacknowledged yet: its own timeout tells
    sent(ep)
    ep.handle_timer(160.0)
    assert sent(ep) == []
    ep.receive_datagram(encode(Message(RST, Code.EMPTY, 0)), PEER, 161.0)  # a stray RST changes nothing
    assert observation.active


def test_the_liveness_schedule_stays_bounded_under_registration_churn():
    ep = endpoint(observer_check_s=100.0)
    for n in range(5_000):  # register and deregister with ever new tokens
        token = n.to_bytes(3, "big")
        register(ep, token=token, mid=n % 60_000, now=float(n) / 1000)
        options = ((Option.OBSERVE, b"\x01"), (Option.URI_PATH, b"temperature"))
        ep.receive_datagram(request(code=Code.GET, mid=(n + 30_000) % 60_000, token=token, options=options), PEER, 0)
    assert ep.stats()["observations"] == 0
    assert len(ep._checks) <= 1024 + 1  # ended observations' entries are dropped as they pile up
    ep.get_timer()
    assert ep._checks == []  # and the rest as the timer looks at them: ended observations are never pinged


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
