"""CoAP codec: RFC byte vectors (cross-checked against aiocoap's encoder), malformed input, round trips, fuzz."""

from __future__ import annotations

import aiocoap
import pytest
from aiocoap.optiontypes import BlockOption
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.coap import codec
from tb_gateway.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    Block,
    CoapFormatError,
    Code,
    Message,
    Option,
    code_str,
    decode,
    decode_in_python,
    decode_uint,
    encode,
    encode_uint,
)


def aiocoap_bytes(message: aiocoap.Message, mtype: aiocoap.numbers.types.Type, mid: int, token: bytes) -> bytes:
    message.mtype = mtype
    message.mid = mid
    message.token = token
    return message.encode()


# (name, our Message, the bytes the RFC figure describes, the same message built with aiocoap)
VECTORS = [
    (
        # RFC 7252 Appendix A, Figure 16: CON [0x7d34] GET /temperature, no token
        "rfc7252-fig16-request",
        Message(CON, Code.GET, 0x7D34, b"", ((Option.URI_PATH, b"temperature"),)),
        bytes.fromhex("40017d34bb74656d7065726174757265"),
        lambda: aiocoap_bytes(aiocoap.Message(code=aiocoap.GET, uri_path=("temperature",)), aiocoap.CON, 0x7D34, b""),
    ),
    (
        # RFC 7252 Figure 16: ACK [0x7d34] 2.05 Content "22.3 C"
        "rfc7252-fig16-response",
        Message(ACK, Code.CONTENT, 0x7D34, b"", (), b"22.3 C"),
        bytes.fromhex("60457d34ff32322e332043"),
        lambda: aiocoap_bytes(aiocoap.Message(code=aiocoap.CONTENT, payload=b"22.3 C"), aiocoap.ACK, 0x7D34, b""),
    ),
    (
        # RFC 7252 Figure 17: CON [0x7d35] GET /temperature with token 0x20; ACK 2.05 "22.5 C" token 0x20
        "rfc7252-fig17-response",
        Message(ACK, Code.CONTENT, 0x7D35, b"\x20", (), b"22.5 C"),
        bytes.fromhex("61457d3520ff32322e352043"),
        lambda: aiocoap_bytes(aiocoap.Message(code=aiocoap.CONTENT, payload=b"22.5 C"), aiocoap.ACK, 0x7D35, b"\x20"),
    ),
    (
        # RFC 7252 Figure 4-style empty ACK and a Reset (empty messages: 4 bytes)
        "empty-ack",
        Message(ACK, Code.EMPTY, 0x7D34),
        bytes.fromhex("60007d34"),
        lambda: aiocoap_bytes(aiocoap.Message(code=aiocoap.EMPTY), aiocoap.ACK, 0x7D34, b""),
    ),
    (
        "reset",
        Message(RST, Code.EMPTY, 0x0001),
        bytes.fromhex("70000001"),
        lambda: aiocoap_bytes(aiocoap.Message(code=aiocoap.EMPTY), aiocoap.RST, 0x0001, b""),
    ),
    (
        # RFC 7641 Figure 2: GET /temperature, Token 0x4a, Observe: 0 (registration)
        "rfc7641-registration",
        Message(CON, Code.GET, 0x0001, b"\x4a", ((Option.OBSERVE, b""), (Option.URI_PATH, b"temperature"))),
        bytes.fromhex("410100014a605b74656d7065726174757265"),
        lambda: aiocoap_bytes(
            aiocoap.Message(code=aiocoap.GET, uri_path=("temperature",), observe=0), aiocoap.CON, 1, b"\x4a"
        ),
    ),
    (
        # RFC 7641 Figure 2: notification 2.05, Token 0x4a, Observe: 12, "22.9 Cel"
        "rfc7641-notification",
        Message(NON, Code.CONTENT, 0x0002, b"\x4a", ((Option.OBSERVE, b"\x0c"),), b"22.9 Cel"),
        bytes.fromhex("514500024a610cff32322e392043656c"),
        lambda: aiocoap_bytes(
            aiocoap.Message(code=aiocoap.CONTENT, observe=12, payload=b"22.9 Cel"), aiocoap.NON, 2, b"\x4a"
        ),
    ),
    (
        # RFC 7959 Figure 11 (simple atomic PUT): CON [MID=1234] PUT /options 1:0/1/128 ...
        "rfc7959-block1-request",
        Message(CON, Code.PUT, 1234, b"", ((Option.URI_PATH, b"options"), (Option.BLOCK1, b"\x0b")), b"x" * 128),
        bytes.fromhex("400304d2b76f7074696f6e73d1030bff") + b"x" * 128,
        lambda: aiocoap_bytes(
            aiocoap.Message(
                code=aiocoap.PUT,
                uri_path=("options",),
                block1=BlockOption.BlockwiseTuple(0, 1, 3),
                payload=b"x" * 128,
            ),
            aiocoap.CON,
            1234,
            b"",
        ),
    ),
    (
        # ... answered ACK [MID=1234] 2.31 Continue 1:0/1/128
        "rfc7959-block1-continue",
        Message(ACK, Code.CONTINUE, 1234, b"", ((Option.BLOCK1, b"\x0b"),)),
        bytes.fromhex("605f04d2d10e0b"),
        lambda: aiocoap_bytes(
            aiocoap.Message(code=aiocoap.CONTINUE, block1=BlockOption.BlockwiseTuple(0, 1, 3)),
            aiocoap.ACK,
            1234,
            b"",
        ),
    ),
    (
        # ... last block: CON [MID=1236] PUT /options 1:2/0/128, answered ACK 2.04 Changed 1:2/0/128
        "rfc7959-block1-final-response",
        Message(ACK, Code.CHANGED, 1236, b"", ((Option.BLOCK1, b"\x23"),)),
        bytes.fromhex("604404d4d10e23"),
        lambda: aiocoap_bytes(
            aiocoap.Message(code=aiocoap.CHANGED, block1=BlockOption.BlockwiseTuple(2, 0, 3)),
            aiocoap.ACK,
            1236,
            b"",
        ),
    ),
    (
        # ThingsBoard telemetry POST: 4-byte token, four Uri-Path options (one 13 bytes: extended length)
        "thingsboard-telemetry",
        Message(
            CON,
            Code.POST,
            0x1234,
            b"\x01\x02\x03\x04",
            (
                (Option.URI_PATH, b"api"),
                (Option.URI_PATH, b"v1"),
                (Option.URI_PATH, b"A1_TEST_TOKEN"),
                (Option.URI_PATH, b"telemetry"),
                (Option.CONTENT_FORMAT, b"\x32"),
            ),
            b'{"temperature":25}',
        ),
        bytes.fromhex(
            "440212340102030"
            "4b36170690276310d0041315f544553545f544f4b454e0974656c656d65747279"
            "1132ff7b2274656d7065726174757265223a32357d"
        ),
        lambda: aiocoap_bytes(
            aiocoap.Message(
                code=aiocoap.POST,
                uri_path=("api", "v1", "A1_TEST_TOKEN", "telemetry"),
                content_format=50,
                payload=b'{"temperature":25}',
            ),
            aiocoap.CON,
            0x1234,
            b"\x01\x02\x03\x04",
        ),
    ),
    (
        # Size1 (60): delta 60 - 27 = 33 -> extended delta byte 33 - 13 = 20
        "extended-delta-size1",
        Message(CON, Code.POST, 7, b"", ((Option.BLOCK1, b"\x0e"), (Option.SIZE1, b"\x08\x00"))),
        bytes.fromhex("40020007d10e0ed2140800"),
        lambda: aiocoap_bytes(
            aiocoap.Message(code=aiocoap.POST, block1=BlockOption.BlockwiseTuple(0, 1, 6), size1=2048),
            aiocoap.CON,
            7,
            b"",
        ),
    ),
]


@pytest.mark.parametrize(("name", "message", "wire", "oracle"), VECTORS, ids=[v[0] for v in VECTORS])
def test_vectors_encode_decode_and_match_aiocoap(name, message, wire, oracle):
    assert encode(message) == wire
    assert decode(wire) == message
    assert oracle() == wire
    theirs = aiocoap.Message.decode(wire)
    assert (int(theirs.mtype), int(theirs.code), theirs.mid, theirs.token, theirs.payload) == (
        message.type,
        message.code,
        message.mid,
        message.token,
        message.payload,
    )


def test_extended_lengths_and_deltas_match_aiocoap():
    """Lengths 12/13/268/269/1000 and deltas crossing 13 and 269 (Proxy-Uri 35, unknown 2000 and 65000)."""
    for length in (0, 12, 13, 268, 269, 1000):
        value = b"p" * length
        ours = encode(Message(CON, Code.GET, 1, b"", ((Option.URI_PATH, value),)))
        theirs = aiocoap.Message(code=aiocoap.GET)
        theirs.opt.uri_path = (value.decode(),)
        assert ours == aiocoap_bytes(theirs, aiocoap.CON, 1, b"")
        assert decode(ours).options == ((Option.URI_PATH, value),)
    options = ((Option.URI_PATH, b"a"), (2000, b"x"), (65000, b"y" * 300))
    wire = encode(Message(NON, Code.POST, 9, b"tok", options, b"body"))
    assert decode(wire).options == options
    theirs = aiocoap.Message.decode(wire)
    assert [(int(o.number), o.encode()) for o in theirs.opt.option_list()] == list(options)
    assert theirs.payload == b"body"
    # 2000 - 11 = 1989 -> nibble 14 with two bytes 1989 - 269 = 1720 = 0x06b8
    assert bytes.fromhex("e106b878") in wire


def test_options_are_sorted_stably_on_encode():
    message = Message(
        CON, Code.GET, 1, b"", ((Option.URI_QUERY, b"q"), (Option.URI_PATH, b"a"), (Option.URI_PATH, b"b"))
    )
    assert decode(encode(message)).options == (
        (Option.URI_PATH, b"a"),
        (Option.URI_PATH, b"b"),
        (Option.URI_QUERY, b"q"),
    )


MALFORMED = [
    ("empty", b"", None),
    ("three bytes", b"\x40\x01\x00", None),
    ("version 0", bytes.fromhex("00010001"), None),
    ("version 2", bytes.fromhex("80010001"), None),
    ("token length 9", bytes.fromhex("4901 0001") + b"123456789", (CON, 1)),
    ("token length 15", bytes.fromhex("5f010002") + b"x" * 15, (NON, 2)),
    ("truncated token", bytes.fromhex("44010003") + b"ab", (CON, 3)),
    ("empty message with token", bytes.fromhex("61000004") + b"t", (ACK, 4)),
    ("empty message with payload", bytes.fromhex("70000005ff00"), (RST, 5)),
    ("payload marker, no payload", bytes.fromhex("40010006ff"), (CON, 6)),
    ("option delta 15", bytes.fromhex("40010007f1"), (CON, 7)),
    ("option length 15", bytes.fromhex("400100081f"), (CON, 8)),
    ("option length 15, then what a 2-byte length would cover", bytes.fromhex("400101001f") + b"x" * 300, (CON, 256)),
    ("truncated extended delta", bytes.fromhex("40010009d0"), (CON, 9)),
    ("truncated 2-byte extended length", bytes.fromhex("4001000a0e01"), (CON, 10)),
    ("value past the end", bytes.fromhex("4001000bb3616263")[:-1], (CON, 11)),
]


@pytest.mark.parametrize(("name", "data", "header"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_raises_format_error_with_header_when_readable(name, data, header):
    with pytest.raises(CoapFormatError) as caught:
        decode(data)
    assert (caught.value.type, caught.value.mid) == (header or (None, None))


def test_every_truncation_of_an_option_header_is_refused():
    wire = encode(Message(CON, Code.GET, 1, b"tk", ((Option.URI_PATH, b"x" * 20), (2000, b"v" * 300))))
    for cut in range(4, len(wire)):
        prefix = wire[:cut]
        try:
            message = decode(prefix)
        except CoapFormatError as exc:
            assert (exc.type, exc.mid) == (CON, 1)
        else:  # only cuts that end exactly between two options are themselves valid messages
            assert encode(message) == prefix


def test_block_and_uint_helpers():
    assert Block.decode(b"\x0b") == Block(0, True, 3)
    assert Block(0, True, 3).size == 128
    assert Block(2, False, 3).encode() == b"\x23"
    assert Block(0, False, 0).encode() == b""
    assert Block.decode(Block(1_000_000, True, 6).encode()) == Block(1_000_000, True, 6)
    with pytest.raises(ValueError):
        Block.decode(b"\x0f")  # szx 7 (BERT)
    with pytest.raises(ValueError):
        Block.decode(b"\x00\x00\x00\x01")
    assert encode_uint(0) == b"" and encode_uint(255) == b"\xff" and encode_uint(256) == b"\x01\x00"
    assert decode_uint(b"") == 0 and decode_uint(b"\x01\x00") == 256
    assert code_str(Code.CREATED) == "2.01" and code_str(Code.REQUEST_ENTITY_TOO_LARGE) == "4.13"


def test_encode_refuses_what_cannot_be_represented():
    with pytest.raises(ValueError):
        encode(Message(CON, Code.GET, 1, b"123456789"))
    with pytest.raises(ValueError):
        encode(Message(CON, Code.GET, 0x10000))
    with pytest.raises(ValueError):
        encode(Message(CON, Code.GET, 1, b"", ((70000, b""),)))


option_items = st.tuples(st.integers(0, 65535 + 269), st.binary(max_size=300))
messages = st.builds(
    Message,
    type=st.integers(0, 3),
    code=st.integers(1, 255),
    mid=st.integers(0, 0xFFFF),
    token=st.binary(max_size=8),
    options=st.lists(option_items, max_size=6).map(lambda opts: tuple(sorted(opts, key=lambda o: o[0]))),
    payload=st.binary(max_size=200),
)


@given(messages)
def test_round_trip(message):
    assert decode(encode(message)) == message


@given(
    path=st.lists(st.text(min_size=0, max_size=40), max_size=5),
    query=st.lists(st.text(min_size=1, max_size=40), max_size=3),
    payload=st.binary(max_size=300),
    content_format=st.sampled_from([None, 0, 42, 50, 60]),
    token=st.binary(max_size=8),
    mid=st.integers(0, 0xFFFF),
)
def test_aiocoap_encoded_requests_decode_identically(path, query, payload, content_format, token, mid):
    theirs = aiocoap.Message(code=aiocoap.POST, uri_path=tuple(path), uri_query=tuple(query), payload=payload)
    if content_format is not None:
        theirs.opt.content_format = content_format
    wire = aiocoap_bytes(theirs, aiocoap.NON, mid, token)
    message = decode(wire)
    assert encode(message) == wire
    assert message.option_values(Option.URI_PATH) == [p.encode() for p in path]
    assert message.option_values(Option.URI_QUERY) == [q.encode() for q in query]
    assert (message.payload, message.token, message.mid, message.type) == (payload, token, mid, NON)


@settings(max_examples=2000)
@given(st.binary(max_size=80) | st.binary(max_size=12).map(lambda tail: b"\x44\x02\x00\x01abcd" + tail))
def test_fuzz_decoder_parses_or_refuses_with_the_documented_error(data):
    try:
        message = decode(data)
    except CoapFormatError as exc:
        assert exc.type is None or (0 <= exc.type <= 3 and 0 <= exc.mid <= 0xFFFF)
    else:
        assert encode(message) == data  # the wire form is canonical: what parses re-encodes byte for byte


def test_the_c_fast_path_is_built() -> None:
    """`make test` builds it (setup.py); without it the comparison below would compare Python with itself."""
    assert codec._speedups is not None


def c_or_python(data: bytes) -> tuple[str, object]:
    fields = codec._speedups.coap_decode(data)
    try:
        reference = decode_in_python(data)
    except CoapFormatError:
        assert fields is None, f"C accepted what Python refuses: {data.hex()}"
        return ("refused", None)
    assert fields is not None, f"C refused a valid message: {data.hex()}"
    assert Message._make(fields) == reference
    assert type(Message._make(fields).options) is tuple
    decoded = decode(data)  # what the codec builds from the C fields: a Message, equal field by field
    assert type(decoded) is Message and decoded._asdict() == reference._asdict()
    return ("decoded", reference)


@settings(max_examples=1500)
@given(
    messages,
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    st.integers(0, 600),
)
def test_the_c_decoder_agrees_with_the_python_one(message, flips, cut):
    """Valid messages, then the same with bytes overwritten and cut short: C and Python decode alike, or both
    refuse (the C one says None and codec.decode asks Python, which raises the error with its reason)."""
    wire = encode(message)
    assert c_or_python(wire) == ("decoded", message)
    mutated = bytearray(wire)
    for at, value in flips:
        if mutated:
            mutated[at % len(mutated)] = value
    c_or_python(bytes(mutated))
    c_or_python(bytes(mutated[:cut]))


@settings(max_examples=500)
@given(st.binary(max_size=40))
def test_the_c_decoder_agrees_on_arbitrary_bytes(data):
    c_or_python(data)


@settings(max_examples=1500)
@given(
    st.integers(0, 3),
    st.integers(0, 8),
    st.sampled_from([0, 1, 2, 3, 4, 65, 132, 255]),
    st.integers(0, 0xFFFF),
    st.one_of(st.binary(max_size=60), st.binary(min_size=260, max_size=600)),
)
def test_the_c_decoder_agrees_on_arbitrary_bytes_after_a_valid_header(mtype, tkl, code, mid, rest):
    c_or_python(bytes((0x40 | mtype << 4 | tkl, code, mid >> 8, mid & 0xFF)) + rest)


@pytest.mark.parametrize("size", [0, 1, 12, 13, 14, 268, 269, 270, 1000, 65535 + 269])
def test_the_c_decoder_agrees_at_every_extended_length_and_delta_boundary(size):
    for number in (size % 65804, 12, 13, 268, 269, 270):
        options = ((number, b"v" * min(size, 2000)), (number + size % 300, b""))
        message = Message(CON, Code.POST, 7, b"tk", options, b"p")
        assert c_or_python(encode(message)) == ("decoded", message)
