"""MQTT 3.1 / 3.1.1 / 5.0 wire codec: an incremental ``Decoder`` and ``encode`` (sans-IO: bytes in, bytes out).

What the decoder promises (the fuzz tests hold it to this):

- ``Decoder.feed(data)`` returns every packet completed by ``data``, in order; an incomplete packet stays
  buffered (``buffered`` says how many bytes) and is reported as nothing yet, never as an error.
- Bad input raises ``DecodeError`` and nothing else: ``MalformedPacket`` (0x81), ``ProtocolViolation`` (0x82)
  or ``PacketTooLarge`` (0x95). The error carries ``packets``, those decoded before it in the same call, so
  the session can answer them first. After an error the decoder stays failed.
- The size limit applies to the remaining length, as soon as the fixed header is read: an oversize packet
  is refused before a byte of its body is buffered.
- Copies are minimal: complete packets are decoded straight from the caller's bytes; only the unfinished tail
  of a read is kept, and a pending packet is completed by taking just the bytes it still needs.

It checks the syntax MQTT defines (flags, lengths, UTF-8, reserved bits, property identifiers and repeats)
but not property value ranges or which property may appear in which packet: the session checks what it uses.
The version decides the layout: it is set by the CONNECT the decoder reads (or given for a client's decoder).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from tb_gateway.construct import constructor
from tb_gateway.mqtt.packets import (
    MQTT_3_1,
    MQTT_5,
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
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

try:  # the C fast path for runs of the common PUBLISH (setup.py builds it where a compiler is present)
    from tb_gateway._speedups import mqtt_publishes as _publishes
except ImportError:  # pragma: no cover - the inline Python decoding does the same
    _publishes = None  # type: ignore[assignment]

_new_publish = constructor(Publish)  # what the C run decoder calls per packet: Publish(...), cheaper


class DecodeError(Exception):
    """Bad bytes from the peer; ``reason_code`` is the MQTT 5 reason for the DISCONNECT it deserves."""

    reason_code = 0x81

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.packets: list[Packet] = []


class MalformedPacket(DecodeError):
    reason_code = 0x81


class ProtocolViolation(DecodeError):
    reason_code = 0x82


class PacketTooLarge(DecodeError):
    reason_code = 0x95


# --- v5 properties: identifier -> value kind -------------------------------------------------------------

_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
PROPERTY_KINDS: dict[int, int] = {
    0x01: _BYTE, 0x02: _U32, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _U32,
    0x12: _UTF8, 0x13: _U16, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE,
    0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
REPEATABLE = frozenset({0x0B, 0x26})  # Subscription Identifier, User Property
VARINT_MAX = 268_435_455
_TOPIC_CACHE_SIZE = 16  # per connection: enough for every topic a device uses, small for 100k connections

# Fixed-header flag nibble each packet type must carry (PUBLISH is checked on its own).
_REQUIRED_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0, 15: 0}


def _valid_first_bytes(version: int) -> bytes:
    table = bytearray(256)
    for first in range(256):
        kind, flags = first >> 4, first & 0x0F
        if kind == 3:
            table[first] = (flags >> 1) & 3 != 3
        elif kind in _REQUIRED_FLAGS and (kind != 15 or version == MQTT_5):
            table[first] = flags == _REQUIRED_FLAGS[kind]
    return bytes(table)


_FIRST_OK = {version: _valid_first_bytes(version) for version in (MQTT_3_1, 4, MQTT_5)}


class _Reader:
    """Bounds-checked reads inside one packet body; running past its end is a malformed packet."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def left(self) -> int:
        return self.end - self.pos

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacket("packet ends early")
        self.pos += 1
        return self.buf[self.pos - 1]

    def u16(self) -> int:
        return int.from_bytes(self.take(2))

    def u32(self) -> int:
        return int.from_bytes(self.take(4))

    def take(self, n: int) -> bytes:
        start = self.pos
        if start + n > self.end:
            raise MalformedPacket("packet ends early")
        self.pos = start + n
        return self.buf[start : self.pos]

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            if b == 0 and shift:
                raise MalformedPacket("variable byte integer not in its shortest form")
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 21:
                raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self) -> str:
        return _text(self.binary())

    def properties(self) -> Properties:
        length = self.varint()
        end = self.pos + length
        if end > self.end:
            raise MalformedPacket("properties run past the packet")
        if end == self.pos:
            return NO_PROPERTIES
        props: dict[int, Any] = {}
        outer, self.end = self.end, end
        while self.pos < end:
            ident = self.varint()
            kind = PROPERTY_KINDS.get(ident)
            if kind is None:
                raise MalformedPacket(f"unknown property 0x{ident:02x}")
            value = _READ_PROPERTY[kind](self)
            if ident in REPEATABLE:
                props[ident] = (*props.get(ident, ()), value)
            elif ident in props:
                raise ProtocolViolation(f"property 0x{ident:02x} given twice")
            else:
                props[ident] = value
        self.end = outer
        return props

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedPacket("unexpected bytes at the end of the packet")


def _text(raw: bytes) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket("string is not valid UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")
    return text


_READ_PROPERTY: dict[int, Callable[[_Reader], Any]] = {
    _BYTE: _Reader.byte,
    _U16: _Reader.u16,
    _U32: _Reader.u32,
    _VARINT: _Reader.varint,
    _UTF8: _Reader.utf8,
    _BINARY: _Reader.binary,
    _PAIR: lambda r: (r.utf8(), r.utf8()),
}


class Decoder:
    """Incremental decoder for one connection (see the module docstring for its contract)."""

    __slots__ = ("_buf", "_failed", "_need", "_topics", "max_packet_bytes", "version")

    def __init__(self, max_packet_bytes: int = VARINT_MAX, version: int = 4) -> None:
        self.max_packet_bytes = max_packet_bytes  # limit on the remaining length (what follows the header)
        self.version = version
        self._buf = bytearray()  # the unfinished packet, never more
        self._need = 0  # its total size once its fixed header is known
        self._failed: DecodeError | None = None
        self._topics: dict[bytes, str] = {}  # raw topic -> validated topic name

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        if self._failed is not None:
            raise self._failed
        packets: list[Packet] = []
        try:
            pos = self._complete_pending(data, packets) if self._buf else 0
            if pos >= 0:
                self._parse(bytes(data), pos, packets)
        except DecodeError as exc:
            exc.packets = packets
            self._failed = exc
            self._buf = bytearray()
            raise
        return packets

    def feed_one_publish(self, data: bytes) -> list[Packet] | None:
        """``feed`` for the commonest read of a device that sends one message at a time: ``data`` is exactly
        one plain QoS 1 PUBLISH (no properties, a topic seen before), decoded by one C call. None, with
        nothing consumed, for anything else: then ``feed``."""
        if (
            _publishes is None
            or len(data) < 2
            or data[0] != 0x32
            or data[1] + 2 != len(data)  # one packet, its remaining length in one byte
            or self._buf
            or self._failed is not None
        ):
            return None
        found, after = _publishes(data, 0, self._topics, self.version == MQTT_5, self.max_packet_bytes, _new_publish)
        return found if after == len(data) else None

    def _header(self, buf: bytes | bytearray, pos: int, n: int) -> tuple[int, int] | None:
        """(fixed header length, remaining length) of the packet at ``pos``; None while incomplete."""
        if not _FIRST_OK[self.version][buf[pos]]:
            raise MalformedPacket(f"invalid packet type or flags 0x{buf[pos]:02x}")
        length = shift = 0
        i = pos + 1
        while True:
            if i >= n:
                return None
            b = buf[i]
            i += 1
            if b == 0 and shift:
                raise MalformedPacket("remaining length not in its shortest form")
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 21:
                raise MalformedPacket("remaining length longer than 4 bytes")
        if length > self.max_packet_bytes:
            raise PacketTooLarge(f"packet of {length} bytes exceeds the limit of {self.max_packet_bytes}")
        return i - pos, length

    def _complete_pending(self, data: bytes, packets: list[Packet]) -> int:
        """Finish the buffered packet with just the bytes it lacks; returns the offset used in ``data``."""
        buf = self._buf
        used = 0
        if not self._need:
            used = min(len(data), 5 - len(buf))  # a fixed header is at most 5 bytes
            buf += data[:used]
            header = self._header(buf, 0, len(buf))
            if header is None:
                return -1
            need = header[0] + header[1]
            if len(buf) > need:  # the header was short and we took bytes of the next packet: give them back
                used -= len(buf) - need
                del buf[need:]
            self._need = need
        missing = self._need - len(buf)
        if missing > 0:
            buf += data[used : used + missing]
            used += min(missing, len(data) - used)
            if len(buf) < self._need:
                return -1
        whole = bytes(buf)
        self._buf = bytearray()
        self._need = 0
        self._parse(whole, 0, packets)
        return used

    def _parse(self, buf: bytes, pos: int, packets: list[Packet]) -> None:
        """Decode every complete packet from ``pos``; keep the unfinished tail.

        The QoS 1 PUBLISH to an already seen topic, with no properties and a one-byte remaining length, is
        decoded inline: it is nearly all the traffic, and a method call costs as much as the decoding. With
        the C fast path a whole run of them is decoded in one call (``_speedups.mqtt_publishes``), a third of
        the cost; the inline code below stays the reference and decodes the rest.
        """
        n = len(buf)
        limit = self.max_packet_bytes
        topics = self._topics
        append = packets.append
        ok = _FIRST_OK[self.version]
        v5 = self.version == MQTT_5
        while pos < n:
            first = buf[pos]
            if first == 0x32 and _publishes is not None:  # a run of the common packet, decoded in C
                found, after = _publishes(buf, pos, topics, v5, limit, _new_publish)
                if after != pos:
                    packets.extend(found)
                    pos = after
                    continue
            second = buf[pos + 1] if pos + 1 < n else 0x80
            if second < 0x80 and second <= limit and ok[first]:
                start = pos + 2
                end = start + second
                if end > n:
                    self._buf = bytearray(memoryview(buf)[pos:])
                    self._need = end - pos
                    return
                if first == 0x32 and second >= 4:
                    p = start + 2 + ((buf[start] << 8) | buf[start + 1])
                    if p + 2 <= end:
                        topic = topics.get(buf[start + 2 : p])
                        packet_id = (buf[p] << 8) | buf[p + 1]
                        p += 2
                        if topic is not None and packet_id and (not v5 or (p < end and buf[p] == 0)):
                            append(_new_publish(topic, buf[p + v5 : end], 1, packet_id))
                            pos = end
                            continue
            else:
                header = self._header(buf, pos, n)
                if header is None:
                    self._buf = bytearray(memoryview(buf)[pos:])
                    return
                start = pos + header[0]
                end = start + header[1]
                if end > n:
                    self._buf = bytearray(memoryview(buf)[pos:])
                    self._need = end - pos
                    return
            append(_DECODERS[first >> 4](self, first & 0x0F, buf, start, end))
            pos = end
            ok = _FIRST_OK[self.version]  # a CONNECT may have set the version
            v5 = self.version == MQTT_5

    # --- per packet type -------------------------------------------------------------------------------

    def _publish(self, flags: int, buf: bytes, start: int, end: int) -> Publish:
        qos = (flags >> 1) & 3
        p = start + 2
        if p > end or (p := p + ((buf[start] << 8) | buf[start + 1])) > end:
            raise MalformedPacket("PUBLISH topic runs past the packet")
        raw = buf[start + 2 : p]
        topic = self._topics.get(raw)
        if topic is None:
            topic = self._new_topic(raw)
        packet_id = 0
        if qos:
            if p + 2 > end:
                raise MalformedPacket("PUBLISH ends early")
            packet_id = (buf[p] << 8) | buf[p + 1]
            if not packet_id:
                raise ProtocolViolation("PUBLISH with QoS > 0 and packet identifier 0")
            p += 2
        elif flags & 8:
            raise ProtocolViolation("DUP set on a QoS 0 PUBLISH")
        props = NO_PROPERTIES
        if self.version == MQTT_5:
            if p < end and buf[p] == 0:
                p += 1
            else:
                reader = _Reader(buf, p, end)
                props = reader.properties()
                p = reader.pos
        elif not topic:
            raise ProtocolViolation("PUBLISH with an empty topic")
        return Publish(topic, buf[p:end], qos, packet_id, flags & 1 == 1, flags & 8 == 8, props)

    def _new_topic(self, raw: bytes) -> str:
        """Validate a topic name once; a device publishes to a handful of topics, so remember a few."""
        topic = _text(raw)
        if "+" in topic or "#" in topic:
            raise ProtocolViolation("PUBLISH topic contains a wildcard")
        if not topic:  # never cached: the session refuses it, so no fast path may hand it over
            return topic
        if len(self._topics) >= _TOPIC_CACHE_SIZE:
            self._topics.clear()
        self._topics[raw] = topic
        return topic

    def _connect(self, flags: int, buf: bytes, start: int, end: int) -> Connect:
        r = _Reader(buf, start, end)
        name = r.utf8()
        version = r.byte()
        if name not in ("MQTT", "MQIsdp"):
            raise ProtocolViolation(f"unknown protocol name {name!r}")
        self.version = version if version in _FIRST_OK else 4  # unknown levels are refused by the session
        bits = r.byte()
        if bits & 1:
            raise MalformedPacket("CONNECT reserved flag set")
        will_flag, will_qos, will_retain = bits & 4, (bits >> 3) & 3, bool(bits & 0x20)
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise MalformedPacket("CONNECT will flags inconsistent")
        if bits & 0x40 and not bits & 0x80 and self.version != MQTT_5:
            raise MalformedPacket("CONNECT password without user name")
        keepalive = r.u16()
        props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
        client_id = r.utf8()
        will = None
        if will_flag:
            will_props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
            will_topic = r.utf8()
            will = Will(will_topic, r.binary(), will_qos, will_retain, will_props)
        username = r.utf8() if bits & 0x80 else None
        password = r.binary() if bits & 0x40 else None
        r.finish()
        return Connect(client_id, version, bool(bits & 2), keepalive, username, password, will, props)

    def _connack(self, flags: int, buf: bytes, start: int, end: int) -> ConnAck:
        r = _Reader(buf, start, end)
        ack = r.byte()
        if ack & 0xFE:
            raise MalformedPacket("CONNACK reserved flags set")
        code = r.byte()
        props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
        r.finish()
        return ConnAck(code, bool(ack & 1), props)

    def _ack(self, cls: Any, buf: bytes, start: int, end: int) -> Any:
        r = _Reader(buf, start, end)
        packet_id = r.u16()
        code, props = 0, NO_PROPERTIES
        if self.version == MQTT_5 and r.left():
            code = r.byte()
            if r.left():
                props = r.properties()
        r.finish()
        return cls(packet_id, code, props)

    def _subscribe(self, flags: int, buf: bytes, start: int, end: int) -> Subscribe:
        r = _Reader(buf, start, end)
        packet_id = r.u16()
        props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
        reserved = 0xC0 if self.version == MQTT_5 else 0xFC
        subscriptions = []
        while r.left():
            topic_filter = r.utf8()
            options = r.byte()
            if options & reserved or options & 3 == 3 or (options >> 4) & 3 == 3:
                raise MalformedPacket("SUBSCRIBE options invalid")
            subscriptions.append((topic_filter, options))
        if not subscriptions:
            raise ProtocolViolation("SUBSCRIBE without a topic filter")
        return Subscribe(packet_id, tuple(subscriptions), props)

    def _suback(self, flags: int, buf: bytes, start: int, end: int) -> SubAck:
        r = _Reader(buf, start, end)
        packet_id = r.u16()
        props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
        return SubAck(packet_id, tuple(r.take(r.left())), props)

    def _unsubscribe(self, flags: int, buf: bytes, start: int, end: int) -> Unsubscribe:
        r = _Reader(buf, start, end)
        packet_id = r.u16()
        props = r.properties() if self.version == MQTT_5 else NO_PROPERTIES
        filters = []
        while r.left():
            filters.append(r.utf8())
        if not filters:
            raise ProtocolViolation("UNSUBSCRIBE without a topic filter")
        return Unsubscribe(packet_id, tuple(filters), props)

    def _unsuback(self, flags: int, buf: bytes, start: int, end: int) -> UnsubAck:
        r = _Reader(buf, start, end)
        packet_id = r.u16()
        if self.version != MQTT_5:
            r.finish()
            return UnsubAck(packet_id)
        props = r.properties()
        return UnsubAck(packet_id, tuple(r.take(r.left())), props)

    def _empty(self, cls: Any, start: int, end: int) -> Any:
        if start != end:
            raise MalformedPacket(f"{cls.__name__} must have no body")
        return cls()

    def _reason_only(self, cls: Any, buf: bytes, start: int, end: int) -> Any:
        if self.version != MQTT_5:
            return self._empty(cls, start, end) if cls is Disconnect else self._not_v3(cls)
        r = _Reader(buf, start, end)
        code = r.byte() if r.left() else 0
        props = r.properties() if r.left() else NO_PROPERTIES
        r.finish()
        return cls(code, props)

    @staticmethod
    def _not_v3(cls: Any) -> Any:  # pragma: no cover - AUTH is refused by the first-byte table before v5
        raise MalformedPacket(f"{cls.__name__} exists only in MQTT 5")


_Decode = Callable[[Decoder, int, bytes, int, int], Packet]
_DECODERS: dict[int, _Decode] = {
    1: Decoder._connect,
    2: Decoder._connack,
    3: Decoder._publish,
    4: lambda d, f, b, s, e: d._ack(PubAck, b, s, e),
    5: lambda d, f, b, s, e: d._ack(PubRec, b, s, e),
    6: lambda d, f, b, s, e: d._ack(PubRel, b, s, e),
    7: lambda d, f, b, s, e: d._ack(PubComp, b, s, e),
    8: Decoder._subscribe,
    9: Decoder._suback,
    10: Decoder._unsubscribe,
    11: Decoder._unsuback,
    12: lambda d, f, b, s, e: d._empty(PingReq, s, e),
    13: lambda d, f, b, s, e: d._empty(PingResp, s, e),
    14: lambda d, f, b, s, e: d._reason_only(Disconnect, b, s, e),
    15: lambda d, f, b, s, e: d._reason_only(Auth, b, s, e),
}


# --- encoding ---------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if not 0 <= n <= VARINT_MAX:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _binary(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise ValueError("string or binary field longer than 65535 bytes")
    return len(raw).to_bytes(2) + raw


def _utf8(text: str) -> bytes:
    return _binary(text.encode())


_WRITE_PROPERTY: dict[int, Callable[[Any], bytes]] = {
    _BYTE: lambda v: bytes((v,)),
    _U16: lambda v: int(v).to_bytes(2),
    _U32: lambda v: int(v).to_bytes(4),
    _VARINT: varint,
    _UTF8: _utf8,
    _BINARY: _binary,
    _PAIR: lambda v: _utf8(v[0]) + _utf8(v[1]),
}


def encode_properties(props: Properties) -> bytes:
    out = bytearray()
    for ident, value in props.items():
        write = _WRITE_PROPERTY[PROPERTY_KINDS[ident]]
        for item in value if ident in REPEATABLE else (value,):
            out += varint(ident) + write(item)
    return varint(len(out)) + out


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def _props(version: int, props: Properties) -> bytes:
    return encode_properties(props) if version == MQTT_5 else b""


def _enc_connect(p: Connect, version: int) -> bytes:
    name = "MQIsdp" if p.version == MQTT_3_1 else "MQTT"
    bits = (p.clean_start << 1) | ((p.username is not None) << 7) | ((p.password is not None) << 6)
    payload = _utf8(p.client_id)
    if p.will is not None:
        bits |= 4 | (p.will.qos << 3) | (p.will.retain << 5)
        payload += _props(p.version, p.will.properties) + _utf8(p.will.topic) + _binary(p.will.payload)
    if p.username is not None:
        payload += _utf8(p.username)
    if p.password is not None:
        payload += _binary(p.password)
    head = _utf8(name) + bytes((p.version, bits)) + p.keepalive_s.to_bytes(2)
    return _frame(0x10, head + _props(p.version, p.properties) + payload)


def _enc_connack(p: ConnAck, version: int) -> bytes:
    return _frame(0x20, bytes((p.session_present, p.reason_code)) + _props(version, p.properties))


def encode_publish(p: Publish, version: int) -> bytes:
    first = 0x30 | (p.dup << 3) | (p.qos << 1) | p.retain
    body = _utf8(p.topic) + (p.packet_id.to_bytes(2) if p.qos else b"") + _props(version, p.properties)
    return _frame(first, body + p.payload)


def _enc_ack(first: int) -> Callable[[Any, int], bytes]:
    def enc(p: Any, version: int) -> bytes:
        body = p.packet_id.to_bytes(2)
        if version == MQTT_5 and (p.reason_code or p.properties):
            body += bytes((p.reason_code,)) + (encode_properties(p.properties) if p.properties else b"")
        return _frame(first, body)

    return enc


def _enc_subscribe(p: Subscribe, version: int) -> bytes:
    body = p.packet_id.to_bytes(2) + _props(version, p.properties)
    body += b"".join(_utf8(topic_filter) + bytes((options,)) for topic_filter, options in p.subscriptions)
    return _frame(0x82, body)


def _enc_suback(p: SubAck, version: int) -> bytes:
    return _frame(0x90, p.packet_id.to_bytes(2) + _props(version, p.properties) + bytes(p.reason_codes))


def _enc_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    body = p.packet_id.to_bytes(2) + _props(version, p.properties)
    return _frame(0xA2, body + b"".join(_utf8(f) for f in p.topic_filters))


def _enc_unsuback(p: UnsubAck, version: int) -> bytes:
    tail = encode_properties(p.properties) + bytes(p.reason_codes) if version == MQTT_5 else b""
    return _frame(0xB0, p.packet_id.to_bytes(2) + tail)


def _enc_reason_only(first: int) -> Callable[[Any, int], bytes]:
    def enc(p: Any, version: int) -> bytes:
        if version != MQTT_5 or (not p.reason_code and not p.properties):
            return bytes((first, 0))
        return _frame(first, bytes((p.reason_code,)) + (encode_properties(p.properties) if p.properties else b""))

    return enc


_ENCODERS: dict[type, Callable[[Any, int], bytes]] = {
    Connect: _enc_connect,
    ConnAck: _enc_connack,
    Publish: encode_publish,
    PubAck: _enc_ack(0x40),
    PubRec: _enc_ack(0x50),
    PubRel: _enc_ack(0x62),
    PubComp: _enc_ack(0x70),
    Subscribe: _enc_subscribe,
    SubAck: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    UnsubAck: _enc_unsuback,
    PingReq: lambda p, v: b"\xc0\x00",
    PingResp: lambda p, v: b"\xd0\x00",
    Disconnect: _enc_reason_only(0xE0),
    Auth: _enc_reason_only(0xF0),
}


def encode(packet: Packet, version: int) -> bytes:
    """Packet -> bytes for a peer speaking ``version``; raises ``ValueError`` for values MQTT cannot carry."""
    return _ENCODERS[type(packet)](packet, version)


_ONE_PUBACK = struct.Struct(">I").pack


def pubacks(packet_ids: list[int]) -> bytes:
    """Success PUBACKs for a run of packet ids (any version): each is the big-endian word 0x4002_<id>."""
    if len(packet_ids) == 1:  # one message in flight: a compiled Struct, not a format built and parsed (15x)
        return _ONE_PUBACK(0x40020000 | packet_ids[0])
    return struct.pack(f">{len(packet_ids)}I", *[0x40020000 | packet_id for packet_id in packet_ids])


def puback(packet_id: int, reason_code: int, version: int) -> bytes:
    """The hot-path PUBACK, without building a packet object."""
    if reason_code and version == MQTT_5:
        return b"\x40\x03" + packet_id.to_bytes(2) + bytes((reason_code,))
    return b"\x40\x02" + packet_id.to_bytes(2)
