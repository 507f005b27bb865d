"""MQTT codec: spec byte vectors (whole, byte by byte, every prefix), hypothesis round trips, decoder fuzz."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_gateway.mqtt.codec import (
    PROPERTY_KINDS,
    DecodeError,
    Decoder,
    MalformedPacket,
    PacketTooLarge,
    ProtocolViolation,
    encode,
    puback,
    pubacks,
    varint,
)
from tb_gateway.mqtt.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)

H = bytes.fromhex

# (version, wire bytes, packet) — layouts from the MQTT 3.1.1 (OASIS 2014) and 5.0 (OASIS 2019) specs;
# the SUBSCRIBE / SUBACK / UNSUBSCRIBE payloads are the specs' own examples (3.8.3, 3.9.3, 3.10.3).
VECTORS: list[tuple[int, bytes, Packet]] = [
    # 3.1.1 CONNECT, spec 3.1.2.10 variable header: "MQTT" level 4, flags 0xCE, keep alive 10
    (
        4,
        H("1022 00044d515454 04 ce 000a 0003636964 0003772f74 00026869 0004746f6b6e 00027077"),
        Connect("cid", 4, True, 10, "tokn", b"pw", Will("w/t", b"hi", 1, False)),
    ),
    # 3.1 CONNECT ("MQIsdp", level 3), token as user name, no password
    (
        3,
        H("1016 00064d514973647003 82 003c 0001 63 0005 544f4b454e"),
        Connect("c", 3, True, 60, "TOKEN"),
    ),
    # 5.0 CONNECT: empty client id, user name, Session Expiry 10 + one User Property
    (
        5,
        H("101e 00044d515454 05 82 0078 0c 110000000a 260001610001 62 0000 0003746f6b"),
        Connect("", 5, True, 120, "tok", None, None, {0x11: 10, 0x26: (("a", "b"),)}),
    ),
    (4, H("20020000"), ConnAck(0, False)),
    (4, H("20020105"), ConnAck(5, True)),
    (5, H("2003000000"), ConnAck(0, False)),
    (5, H("2008000005 210064 2401"), ConnAck(0, False, {0x21: 100, 0x24: 1})),
    (4, H("300b 0003612f62 68656c6c6f 21"), Publish("a/b", b"hello!")),
    # spec 3.3.2.3 example: topic a/b, packet identifier 10
    (4, H("3209 0003612f62 000a 6869"), Publish("a/b", b"hi", 1, 10)),
    (4, H("3b09 0003612f62 000a 6869"), Publish("a/b", b"hi", 1, 10, True, True)),
    (5, H("320a 0003612f62 000a 00 6869"), Publish("a/b", b"hi", 1, 10)),
    (5, H("320c 0003612f62 000a 02 0101 6869"), Publish("a/b", b"hi", 1, 10, properties={1: 1})),
    (4, H("40020001"), PubAck(1)),
    (5, H("40020001"), PubAck(1)),
    (5, H("4003000199"), PubAck(1, 0x99)),
    (5, H("40040001 97 00"), PubAck(1, 0x97)),
    (4, H("50020007"), PubRec(7)),
    (4, H("62020007"), PubRel(7)),
    (4, H("70020007"), PubComp(7)),
    (5, H("5003000780"), PubRec(7, 0x80)),
    (4, H("820e000a 0003612f6201 0003632f6402"), Subscribe(10, (("a/b", 1), ("c/d", 2)))),
    (5, H("820f000a00 0003612f6201 0003632f6402"), Subscribe(10, (("a/b", 1), ("c/d", 2)))),
    (4, H("9006000a00010280"), SubAck(10, (0, 1, 2, 0x80))),
    (5, H("9005000a00018f"), SubAck(10, (1, 0x8F))),
    (4, H("a20c000a 0003612f62 0003632f64"), Unsubscribe(10, ("a/b", "c/d"))),
    (5, H("a20d000a00 0003612f62 0003632f64"), Unsubscribe(10, ("a/b", "c/d"))),
    (4, H("b002000a"), UnsubAck(10)),
    (5, H("b005000a000011"), UnsubAck(10, (0, 0x11))),
    (4, H("c000"), PingReq()),
    (4, H("d000"), PingResp()),
    (4, H("e000"), Disconnect()),
    (5, H("e000"), Disconnect()),
    (5, H("e0018e"), Disconnect(0x8E)),
    (5, H("e00704 05 1f0002 6279"), Disconnect(4, {0x1F: "by"})),
    (5, H("f000"), Auth()),
    (5, H("f0021800"), Auth(0x18)),
]

IDS = [f"v{v}-{type(p).__name__}-{i}" for i, (v, _, p) in enumerate(VECTORS)]


def decode_all(data: bytes, version: int, chunk: int | None = None, limit: int = 1 << 28) -> list[Packet]:
    decoder = Decoder(limit, version)
    if chunk is None:
        return decoder.feed(data)
    out: list[Packet] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
    assert decoder.buffered == 0
    return out


@pytest.mark.parametrize(("version", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_decodes_whole_and_byte_by_byte(version: int, wire: bytes, packet: Packet) -> None:
    assert decode_all(wire, version) == [packet]
    assert decode_all(wire, version, chunk=1) == [packet]
    assert decode_all(wire * 3, version, chunk=2) == [packet] * 3


@pytest.mark.parametrize(("version", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_every_truncated_prefix_is_incomplete(version: int, wire: bytes, packet: Packet) -> None:
    for cut in range(len(wire)):
        decoder = Decoder(version=version)
        assert decoder.feed(wire[:cut]) == []
        assert decoder.buffered == cut
        assert decoder.feed(wire[cut:]) == [packet]  # and the rest completes it
        assert decoder.buffered == 0


@pytest.mark.parametrize(("version", "wire", "packet"), VECTORS, ids=IDS)
def test_vector_encodes_back(version: int, wire: bytes, packet: Packet) -> None:
    # an empty property list after a reason code is legal, but the encoder leaves it out
    canonical = {H("40040001 97 00"): H("4003000197"), H("f0021800"): H("f00118")}
    assert encode(packet, version) == canonical.get(wire, wire)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2097151, "ffff7f"),
        (2097152, "80808001"),
        (268435455, "ffffff7f"),
    ],
)
def test_variable_byte_integer_vectors(value: int, wire: str) -> None:
    """Spec 1.5.5 table; read back as a PUBLISH remaining length (what the decoder must size first)."""
    assert varint(value) == H(wire)
    if value < 3:
        return
    decoder = Decoder()
    assert decoder.feed(b"\x30" + H(wire)) == []  # header alone: the body is still to come
    assert decoder.buffered == 1 + len(H(wire))


def test_varint_out_of_range_is_refused_by_encoder() -> None:
    with pytest.raises(ValueError):
        varint(268435456)


def test_hot_path_puback() -> None:
    assert puback(1, 0, 4) == H("40020001")
    assert puback(258, 0x97, 5) == H("4003010297")
    assert puback(258, 0x97, 4) == H("40020102")  # 3.x PUBACK carries no code


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=40))
def test_a_run_of_pubacks_is_each_puback_in_turn(packet_ids: list[int]) -> None:
    assert pubacks(packet_ids) == b"".join(puback(packet_id, 0, 5) for packet_id in packet_ids)


# --- refusals: each with the documented error ------------------------------------------------------------

BAD: list[tuple[str, int, bytes, type[DecodeError]]] = [
    ("reserved type 0", 4, H("0000"), MalformedPacket),
    ("AUTH before v5", 4, H("f000"), MalformedPacket),
    ("PUBLISH QoS 3", 4, H("3605 0001 61 0001"), MalformedPacket),
    ("SUBSCRIBE flags 0", 4, H("8006 000a 0001 61 00"), MalformedPacket),
    ("PUBREL flags 0", 4, H("60020001"), MalformedPacket),
    ("PINGREQ flags", 4, H("c100"), MalformedPacket),
    ("remaining length 5 bytes", 4, H("30 ffffffff7f"), MalformedPacket),
    ("remaining length not minimal", 4, H("c0 8000"), MalformedPacket),
    ("PINGREQ with body", 4, H("c00100"), MalformedPacket),
    ("topic past end", 4, H("3003 0005 61"), MalformedPacket),
    ("topic not UTF-8", 4, H("3004 0002 c328"), MalformedPacket),
    ("topic with NUL", 4, H("3004 0002 6100"), MalformedPacket),
    ("topic wildcard", 4, H("3005 0003 612f23"), ProtocolViolation),
    ("topic empty 3.1.1", 4, H("3002 0000"), ProtocolViolation),
    ("QoS1 PUBLISH too short for a topic length", 4, H("3201 00"), MalformedPacket),
    ("QoS1 PUBLISH empty", 5, H("3200"), MalformedPacket),
    ("QoS1 packet id 0", 4, H("3205 0001 61 0000"), ProtocolViolation),
    ("DUP on QoS 0", 4, H("3803 0001 61"), ProtocolViolation),
    ("CONNECT reserved flag", 4, H("100c 00044d515454 04 03 003c 0000"), MalformedPacket),
    ("CONNECT bad name", 4, H("100c 00044d515459 04 02 003c 0000"), ProtocolViolation),
    ("CONNECT will QoS 3", 4, H("100c 00044d515454 04 1e 003c 0000"), MalformedPacket),
    ("CONNECT password no user", 4, H("100e 00044d515454 04 42 003c 0000 0000"), MalformedPacket),
    ("CONNECT trailing bytes", 4, H("100d 00044d515454 04 02 003c 0000 ff"), MalformedPacket),
    ("SUBSCRIBE empty", 4, H("8202 000a"), ProtocolViolation),
    ("SUBSCRIBE reserved bits", 4, H("8206 000a 0001 61 05"), MalformedPacket),
    ("UNSUBSCRIBE empty", 4, H("a202 000a"), ProtocolViolation),
    ("PUBACK too long 3.1.1", 4, H("4003 0001 00"), MalformedPacket),
    ("v5 unknown property", 5, H("3207 0001 61 0001 01 7f"), MalformedPacket),
    ("v5 property twice", 5, H("320a 0001 61 0001 04 0101 0101"), ProtocolViolation),
    ("v5 properties past end", 5, H("3206 0001 61 0001 09"), MalformedPacket),
    ("v5 no property length", 5, H("3205 0001 61 0001"), MalformedPacket),
    ("v5 SUBSCRIBE retain handling 3", 5, H("8207 000a 00 0001 61 30"), MalformedPacket),
]


@pytest.mark.parametrize(("name", "version", "wire", "error"), BAD, ids=[b[0] for b in BAD])
def test_bad_packet_is_refused_with_its_error(name: str, version: int, wire: bytes, error: type) -> None:
    for chunk in (None, 1):
        with pytest.raises(error):
            decode_all(wire, version, chunk)


def test_oversize_is_refused_from_the_fixed_header_alone() -> None:
    decoder = Decoder(max_packet_bytes=100)
    with pytest.raises(PacketTooLarge) as caught:
        decoder.feed(H("30 65"))  # remaining length 101: nothing of the body has arrived
    assert caught.value.reason_code == 0x95
    assert decoder.buffered == 0
    with pytest.raises(PacketTooLarge):  # the decoder stays failed
        decoder.feed(H("c000"))
    assert Decoder(100).feed(H("30 64") + H("0001 61") + b"x" * 97)[0] == Publish("a", b"x" * 97)


def test_oversize_refused_with_a_multibyte_length_split_across_reads() -> None:
    decoder = Decoder(max_packet_bytes=1000)
    assert decoder.feed(H("30 e9")) == []  # 0xe9 0x07 = 1001
    with pytest.raises(PacketTooLarge):
        decoder.feed(H("07"))


def test_packets_before_an_error_are_handed_over() -> None:
    ping, publish = H("c000"), H("3209 0003612f62 000a 6869")
    with pytest.raises(MalformedPacket) as caught:
        Decoder().feed(ping + publish + H("0000"))
    assert caught.value.packets == [PingReq(), Publish("a/b", b"hi", 1, 10)]


def test_connect_sets_the_version_for_what_follows_in_the_same_read() -> None:
    connect = encode(Connect("c", 5), 5)
    publish = H("320a 0003612f62 000a 00 6869")
    decoder = Decoder()
    assert decoder.feed(connect + publish) == [Connect("c", 5), Publish("a/b", b"hi", 1, 10)]
    assert decoder.version == 5


def test_unknown_protocol_level_decodes_as_3_1_1_for_the_session_to_refuse() -> None:
    wire = H("100c 00044d515454 07 02 003c 0000")
    decoder = Decoder()
    assert decoder.feed(wire) == [Connect("", 7, True, 60)]
    assert decoder.version == 4


def test_pending_packet_is_completed_with_only_the_bytes_it_lacks() -> None:
    one = encode(Publish("t", b"x" * 200, 1, 1), 4)
    two = encode(Publish("t", b"y", 1, 2), 4)
    decoder = Decoder()
    assert decoder.feed(one[:50]) == []
    assert decoder.buffered == 50
    assert decoder.feed(one[50:] + two[:3]) == [Publish("t", b"x" * 200, 1, 1)]
    assert decoder.buffered == 3
    assert decoder.feed(two[3:]) == [Publish("t", b"y", 1, 2)]


def test_short_pending_header_gives_back_bytes_of_the_next_packet() -> None:
    decoder = Decoder()
    assert decoder.feed(H("c0")) == []
    assert decoder.feed(H("00 d000 c0")) == [PingReq(), PingResp()]
    assert decoder.buffered == 1


# --- hypothesis: round trips --------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
topic = text.filter(lambda t: "+" not in t and "#" not in t)
blob = st.binary(max_size=40)
u16 = st.integers(1, 0xFFFF)
reason = st.integers(0, 255)
_VALUES: dict[int, Any] = {
    0: st.integers(0, 255),
    1: st.integers(0, 0xFFFF),
    2: st.integers(0, 0xFFFFFFFF),
    3: st.integers(0, 268435455),
    4: text,
    5: blob,
    6: st.tuples(text, text),
}


@st.composite
def properties(draw: st.DrawFn) -> dict[int, Any]:
    idents = draw(st.lists(st.sampled_from(sorted(PROPERTY_KINDS)), max_size=4, unique=True))
    props: dict[int, Any] = {}
    for ident in idents:
        value = _VALUES[PROPERTY_KINDS[ident]]
        props[ident] = tuple(draw(st.lists(value, min_size=1, max_size=2))) if ident in (0x0B, 0x26) else draw(value)
    return props


def props_for(version: int) -> st.SearchStrategy[Any]:
    return properties() if version == 5 else st.just(NO_PROPERTIES)


@st.composite
def packets(draw: st.DrawFn, version: int) -> Packet:
    p = props_for(version)
    kind = draw(st.integers(1, 15 if version == 5 else 14))
    if kind == 1:
        will = draw(st.none() | st.builds(Will, text, blob, st.integers(0, 2), st.booleans(), props_for(version)))
        user = draw(st.none() | text)
        password = draw(st.none() | blob) if (user is not None or version == 5) else None
        return Connect(
            draw(text), version, draw(st.booleans()), draw(st.integers(0, 0xFFFF)), user, password, will, draw(p)
        )
    if kind == 2:
        return ConnAck(draw(reason), draw(st.booleans()), draw(p))
    if kind == 3:
        qos = draw(st.integers(0, 2))
        name = draw(topic if version == 5 else topic.filter(bool))
        return Publish(
            name,
            draw(blob),
            qos,
            draw(u16) if qos else 0,
            draw(st.booleans()),
            qos > 0 and draw(st.booleans()),
            draw(p),
        )
    if kind in (4, 5, 6, 7):
        cls: Any = {4: PubAck, 5: PubRec, 6: PubRel, 7: PubComp}[kind]
        return cls(draw(u16), draw(reason) if version == 5 else 0, draw(p))
    if kind == 8:
        options = st.integers(0, 2) | (
            st.integers(0, 0x3F).filter(lambda o: o & 3 != 3 and (o >> 4) != 3) if version == 5 else st.nothing()
        )
        subs = draw(st.lists(st.tuples(text, options), min_size=1, max_size=3))
        return Subscribe(draw(u16), tuple(subs), draw(p))
    if kind == 9:
        return SubAck(draw(u16), tuple(draw(st.lists(reason, min_size=1, max_size=3))), draw(p))
    if kind == 10:
        return Unsubscribe(draw(u16), tuple(draw(st.lists(text, min_size=1, max_size=3))), draw(p))
    if kind == 11:
        codes = tuple(draw(st.lists(reason, max_size=3))) if version == 5 else ()
        return UnsubAck(draw(u16), codes, draw(p))
    if kind == 12:
        return PingReq()
    if kind == 13:
        return PingResp()
    if kind == 14:
        return Disconnect(draw(reason), draw(p)) if version == 5 else Disconnect()
    return Auth(draw(reason), draw(p))


@pytest.mark.parametrize("version", [3, 4, 5])
@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_any_chunking(version: int, data: st.DataObject) -> None:
    sequence = data.draw(st.lists(packets(version), min_size=1, max_size=5))
    if version != 4 and any(type(p) is Connect for p in sequence):
        sequence = [p for p in sequence if type(p) is not Connect]  # a CONNECT sets its own version
        if not sequence:
            return
    wire = b"".join(encode(p, version) for p in sequence)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = Decoder(version=version)
    got: list[Packet] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[start:end])
    assert got == sequence
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", [3, 4, 5])
@given(connect=st.data())
@settings(max_examples=100, deadline=None)
def test_connect_round_trip_per_version(version: int, connect: st.DataObject) -> None:
    packet = connect.draw(packets(version).filter(lambda p: type(p) is Connect))
    assert Decoder().feed(encode(packet, version)) == [packet]


# --- hypothesis: fuzz ----------------------------------------------------------------------------------


def feed_or_refuse(data: bytes, version: int, cuts: list[int], limit: int) -> list[Packet]:
    decoder = Decoder(limit, version)
    got: list[Packet] = []
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            got += decoder.feed(data[start:end])
    except DecodeError as exc:  # the one documented error; anything else fails the test
        assert exc.reason_code in (0x81, 0x82, 0x95)
        assert isinstance(exc, MalformedPacket | ProtocolViolation | PacketTooLarge)
        return [*got, *exc.packets]
    return got


@given(st.binary(max_size=300), st.sampled_from([3, 4, 5]), st.lists(st.integers(0, 300), max_size=5))
@settings(max_examples=1500, deadline=None)
def test_fuzz_random_bytes(data: bytes, version: int, cuts: list[int]) -> None:
    cuts = sorted(c for c in cuts if c <= len(data))
    feed_or_refuse(data, version, cuts, limit=200)


@given(st.data())
@settings(max_examples=1500, deadline=None)
def test_fuzz_mutated_valid_packets(data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([4, 5]))
    wire = bytearray(
        b"".join(encode(p, version) for p in data.draw(st.lists(packets(version), min_size=1, max_size=3)))
    )
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(wire) - 1)))
        if op == "flip" and wire:
            wire[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del wire[at : at + data.draw(st.integers(1, 4))]
        else:
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    whole = feed_or_refuse(bytes(wire), version, [], limit=1 << 20)
    by_byte = feed_or_refuse(bytes(wire), version, list(range(1, len(wire))), limit=1 << 20)
    assert whole == by_byte  # any chunking gives the same packets, before an error as well


# --- the C fast path for runs of PUBLISH (_speedups.mqtt_publishes) against the inline Python decoding ------

from tb_gateway.mqtt import codec  # noqa: E402

TOPICS = [b"v1/devices/me/telemetry", b"v1/devices/me/attributes", b"a/b", b"", b"v2/t"]


@st.composite
def publish_streams(draw: st.DrawFn) -> tuple[int, bytes]:
    """Mostly the common QoS 1 PUBLISH, with near misses: QoS 0 / 2, packet id 0, properties, long lengths."""
    version = draw(st.sampled_from([4, 5]))
    wire = bytearray()
    for _ in range(draw(st.integers(1, 12))):
        topic = draw(st.sampled_from(TOPICS))
        first = draw(st.sampled_from([0x32] * 6 + [0x30, 0x34, 0x3A, 0x33, 0xC0]))
        if first == 0xC0:  # PINGREQ between PUBLISHes
            wire += b"\xc0\x00"
            continue
        pid = draw(st.sampled_from([7, 7, 7, 0, 65535]))
        body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if first & 0x06 else b"")
        if version == 5:
            body += draw(st.sampled_from([b"\x00", b"\x00", b"\x02\x01\x01", b"\x05"]))
        body += draw(st.binary(max_size=draw(st.sampled_from([20, 130]))))
        wire += bytes([first]) + varint(len(body)) + body
    for _ in range(draw(st.integers(0, 2))):  # a few mutations
        at = draw(st.integers(0, max(0, len(wire) - 1)))
        if wire:
            wire[at] ^= draw(st.integers(1, 255))
    return version, bytes(wire)


@given(publish_streams(), st.lists(st.integers(0, 2000), max_size=4), st.sampled_from([1 << 20, 60]))
@settings(max_examples=2000, deadline=None)
def test_the_c_publish_run_decodes_as_the_python_code(stream: tuple[int, bytes], cuts: list[int], limit: int) -> None:
    version, wire = stream
    cuts = sorted(c for c in cuts if c <= len(wire))
    assert codec._publishes is not None, "the C fast path is built by make test"
    fast = _decode_all(wire, version, cuts, limit)
    saved, codec._publishes = codec._publishes, None
    try:
        reference = _decode_all(wire, version, cuts, limit)
    finally:
        codec._publishes = saved
    assert repr(fast) == repr(reference)  # the same packets, and the same error after them if any


def _decode_all(wire: bytes, version: int, cuts: list[int], limit: int) -> tuple[list[Packet], str | None]:
    decoder = Decoder(limit, version)
    got: list[Packet] = []
    try:
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            got += decoder.feed(wire[start:end])
    except DecodeError as exc:
        return got + exc.packets, f"{type(exc).__name__} {exc.reason_code:#x} {exc}"
    return got, None


@st.composite
def one_packet_reads(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """Reads of one packet each (sometimes two, or a part): plain QoS 1 PUBLISHes and their near misses."""
    version = draw(st.sampled_from([4, 5]))
    reads = []
    for _ in range(draw(st.integers(1, 10))):
        topic = draw(st.sampled_from(TOPICS))
        first = draw(st.sampled_from([0x32] * 6 + [0x30, 0x3A, 0xC0]))
        pid = draw(st.sampled_from([9, 9, 0]))
        body = len(topic).to_bytes(2, "big") + topic + (pid.to_bytes(2, "big") if first & 0x06 else b"")
        if version == 5:
            body += draw(st.sampled_from([b"\x00", b"\x00", b"\x02\x01\x01"]))
        body += draw(st.binary(max_size=draw(st.sampled_from([20, 130]))))
        packet = b"\xc0\x00" if first == 0xC0 else bytes([first]) + varint(len(body)) + body
        shape = draw(st.sampled_from(["whole"] * 4 + ["pair", "split"]))
        if shape == "pair" and reads:
            reads[-1] += packet
        elif shape == "split" and len(packet) > 2:
            at = draw(st.integers(1, len(packet) - 1))
            reads += [packet[:at], packet[at:]]
        else:
            reads.append(packet)
    return version, reads


@given(one_packet_reads())
@settings(max_examples=1000, deadline=None)
def test_one_publish_read_in_c_is_what_feed_decodes(stream: tuple[int, list[bytes]]) -> None:
    """``feed_one_publish`` answers a read exactly as ``feed`` would, or declines it having consumed nothing."""
    version, reads = stream
    fast, reference = Decoder(1 << 20, version), Decoder(1 << 20, version)
    for data in reads:
        try:
            expected: list[Packet] | str = reference.feed(data)
        except DecodeError as exc:
            expected = f"{type(exc).__name__} {exc}"
        got = fast.feed_one_publish(data)
        if got is not None:
            assert all(type(p) is Publish and p.qos == 1 and not p.properties for p in got)
        else:
            try:
                got = fast.feed(data)
            except DecodeError as exc:
                got = f"{type(exc).__name__} {exc}"
        assert repr(got) == repr(expected)
        if isinstance(expected, str):
            break


@pytest.mark.parametrize("version", [4, 5])
def test_one_publish_read_takes_the_c_path_once_its_topic_is_known(version: int) -> None:
    wire = encode(Publish("v1/devices/me/telemetry", b'{"t":1}', 1, 5), version)
    decoder = Decoder(1 << 20, version)
    assert decoder.feed_one_publish(wire) is None  # a topic not validated yet
    assert decoder.feed(wire) == [Publish("v1/devices/me/telemetry", b'{"t":1}', 1, 5)]
    assert decoder.feed_one_publish(wire) == [Publish("v1/devices/me/telemetry", b'{"t":1}', 1, 5)]
    assert decoder.feed_one_publish(wire + wire) is None  # two packets: feed
    assert decoder.feed_one_publish(wire[:-1]) is None  # a part: feed
    if version == 5:  # an empty topic decodes (the session refuses it) but is never taken by the C path
        empty = encode(Publish("", b"{}", 1, 6), version)
        assert decoder.feed(empty) == decoder.feed(empty) == [Publish("", b"{}", 1, 6)]
        assert decoder.feed_one_publish(empty) is None
