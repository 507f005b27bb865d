"""CoAP message codec (RFC 7252 §3): bytes <-> ``Message``, nothing else.

``decode`` either returns a ``Message`` or raises ``CoapFormatError`` — never any other exception, whatever
the input (a hypothesis fuzz test holds it to that). The error carries the message type and id when the
4-byte header was readable, because RFC 7252 §4.2/§4.3 wants a malformed CON answered with a Reset and
everything else silently dropped; which of the two is the endpoint's decision, not the codec's.

Options are kept as a tuple of ``(number, value)`` pairs in wire order; option *semantics* (uint and block
values, which are critical) live here as small helpers so the endpoint and the tests share them.

A well-formed datagram is parsed in C when the fast path is built (``_speedups.coap_decode``); anything it
does not accept is parsed again here, so the errors and their reasons always come from this module.
"""

from __future__ import annotations

from typing import NamedTuple

try:  # the C fast path (setup.py builds it when a compiler is present)
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - a build without a C compiler parses in Python only
    _speedups = None  # type: ignore[assignment]

VERSION = 1
CON, NON, ACK, RST = 0, 1, 2, 3
TYPE_NAMES = ("CON", "NON", "ACK", "RST")
PAYLOAD_MARKER = 0xFF


def code(cls: int, detail: int) -> int:
    """``code(2, 1)`` is 2.01 = 0x41."""
    return cls << 5 | detail


def code_str(value: int) -> str:
    return f"{value >> 5}.{value & 0x1F:02d}"


class Code:
    """Method and response codes used by the gateway (RFC 7252 §12.1, RFC 7959 §2.9)."""

    EMPTY = 0
    GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
    CREATED = code(2, 1)
    DELETED = code(2, 2)
    VALID = code(2, 3)
    CHANGED = code(2, 4)
    CONTENT = code(2, 5)
    CONTINUE = code(2, 31)
    BAD_REQUEST = code(4, 0)
    UNAUTHORIZED = code(4, 1)
    BAD_OPTION = code(4, 2)
    NOT_FOUND = code(4, 4)
    METHOD_NOT_ALLOWED = code(4, 5)
    NOT_ACCEPTABLE = code(4, 6)
    REQUEST_ENTITY_INCOMPLETE = code(4, 8)
    REQUEST_ENTITY_TOO_LARGE = code(4, 13)
    UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
    TOO_MANY_REQUESTS = code(4, 29)  # RFC 8516: rate limited or address blocked, with Max-Age
    INTERNAL_SERVER_ERROR = code(5, 0)
    NOT_IMPLEMENTED = code(5, 1)
    SERVICE_UNAVAILABLE = code(5, 3)
    PROXYING_NOT_SUPPORTED = code(5, 5)


class Option:
    """Option numbers (RFC 7252 §5.10, RFC 7641 §2, RFC 7959 §2.1, §4)."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60


class ContentFormat:
    TEXT = 0
    OCTET_STREAM = 42
    JSON = 50
    CBOR = 60


Options = tuple[tuple[int, bytes], ...]


class Message(NamedTuple):
    """One CoAP message. A NamedTuple: immutable and the cheapest value object CPython builds."""

    type: int
    code: int
    mid: int
    token: bytes = b""
    options: Options = ()
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        """The first value of an option, or None when absent."""
        for num, value in self.options:
            if num == number:
                return value
        return None

    def option_values(self, number: int) -> list[bytes]:
        return [value for num, value in self.options if num == number]


class CoapFormatError(ValueError):
    """A datagram that is not a well-formed CoAP message.

    ``type`` and ``mid`` are set when the fixed header was readable (so a CON can be answered with RST),
    else ``None``.
    """

    def __init__(self, reason: str, type: int | None = None, mid: int | None = None) -> None:
        super().__init__(reason)
        self.type = type
        self.mid = mid


def decode(data: bytes) -> Message:
    """Parse one datagram; raise ``CoapFormatError`` (only) when it is not a valid CoAP message."""
    if _speedups is not None and type(data) is bytes:
        fields = _speedups.coap_decode(data)
        if fields is not None:
            return _message(Message, fields)  # Message._make without its Python frame and length check
    return decode_in_python(data)


_message = tuple.__new__


def decode_in_python(data: bytes) -> Message:
    """The reference parser: every rule and every error reason (the C one returns None where this raises)."""
    n = len(data)
    if n < 4:
        raise CoapFormatError("shorter than the 4-byte header")
    first = data[0]
    if first >> 6 != VERSION:
        raise CoapFormatError("version is not 1")
    mtype = (first >> 4) & 3
    mid = data[2] << 8 | data[3]
    tkl = first & 0x0F
    msg_code = data[1]
    if tkl > 8:
        raise CoapFormatError("token length 9-15 is reserved", mtype, mid)
    if msg_code == 0 and (tkl or n > 4):
        raise CoapFormatError("empty message with token, options or payload", mtype, mid)
    pos = 4 + tkl
    if pos > n:
        raise CoapFormatError("truncated token", mtype, mid)
    token = data[4:pos]
    options: list[tuple[int, bytes]] = []
    number = 0
    try:
        while pos < n:
            byte = data[pos]
            pos += 1
            if byte == PAYLOAD_MARKER:
                if pos == n:
                    raise CoapFormatError("payload marker with an empty payload", mtype, mid)
                break
            delta = byte >> 4
            length = byte & 0x0F
            if delta >= 13:
                if delta == 13:
                    delta = data[pos] + 13
                    pos += 1
                elif delta == 14:
                    delta = (data[pos] << 8 | data[pos + 1]) + 269
                    pos += 2
                else:
                    raise CoapFormatError("option delta 15 is reserved", mtype, mid)
            if length >= 13:
                if length == 13:
                    length = data[pos] + 13
                    pos += 1
                elif length == 14:
                    length = (data[pos] << 8 | data[pos + 1]) + 269
                    pos += 2
                else:
                    raise CoapFormatError("option length 15 is reserved", mtype, mid)
            number += delta
            end = pos + length
            if end > n:
                raise CoapFormatError("option value runs past the datagram", mtype, mid)
            options.append((number, data[pos:end]))
            pos = end
    except IndexError:
        raise CoapFormatError("truncated option header", mtype, mid) from None
    return Message(mtype, msg_code, mid, token, tuple(options), data[pos:])


def _extend(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    if value <= 0xFFFF + 269:
        return 14, (value - 269).to_bytes(2, "big")
    raise ValueError(f"option delta or length {value} does not fit")


def encode(msg: Message) -> bytes:
    """Serialize; options are sorted by number (stable, so repeated options keep their order)."""
    token = msg.token
    if len(token) > 8:
        raise ValueError("token longer than 8 bytes")
    if not 0 <= msg.mid <= 0xFFFF or not 0 <= msg.code <= 0xFF or not 0 <= msg.type <= 3:
        raise ValueError("message id, code or type out of range")
    out = bytearray((0x40 | msg.type << 4 | len(token), msg.code, msg.mid >> 8, msg.mid & 0xFF))
    out += token
    if msg.options:
        last = 0
        for number, value in sorted(msg.options, key=_number):
            delta, delta_ext = _extend(number - last)
            length, length_ext = _extend(len(value))
            out.append(delta << 4 | length)
            out += delta_ext
            out += length_ext
            out += value
            last = number
    if msg.payload:
        out.append(PAYLOAD_MARKER)
        out += msg.payload
    return bytes(out)


def _number(option: tuple[int, bytes]) -> int:
    return option[0]


def is_critical(number: int) -> bool:
    return number & 1 == 1


def encode_uint(value: int) -> bytes:
    """Minimal big-endian bytes; 0 is the empty string (RFC 7252 §3.2)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")


class Block(NamedTuple):
    """A Block1/Block2 option value (RFC 7959 §2.2): block number, more flag, size exponent."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    def encode(self) -> bytes:
        return encode_uint(self.num << 4 | int(self.more) << 3 | self.szx)

    @classmethod
    def decode(cls, value: bytes) -> Block:
        """Raise ``ValueError`` for a value longer than 3 bytes or the reserved size exponent 7 (BERT)."""
        if len(value) > 3:
            raise ValueError("block option longer than 3 bytes")
        raw = decode_uint(value)
        szx = raw & 7
        if szx == 7:
            raise ValueError("block size exponent 7 (BERT) is not supported")
        return cls(raw >> 4, bool(raw & 8), szx)
