"""One MQTT connection as a state machine, sans-IO: bytes and the time in, events and bytes out.

::

    AWAITING_CONNECT --CONNECT--> AUTHENTICATING --accept()--> CONNECTED
           |                            |  (packets queued,        |
           |                            |   at most 100)           |
           +---------- any error, refuse(), close(), peer DISCONNECT, keep-alive expiry ----> TERMINATED

Protocol errors from the peer never raise: they queue the wire goodbye (MQTT 5 DISCONNECT with its reason
code; 3.x just closes) and end in ``ConnectionTerminated``. The adapter writes ``data_to_send()`` and closes
the socket when it sees that event.

The session owns what MQTT itself defines: packet order, CONNACK, SUBACK/UNSUBACK, PINGRESP, the in-flight
count, keep-alive (1.5 x the client's value) and QoS 2 refusal. What the topics *mean* is the adapter's
business (``topics.py``), except which subscribe filters exist, given as ``accept_filter``.

QoS 2 (ThingsBoard never handled it, spec §1.14): MQTT 5 clients are told ``Maximum QoS = 1`` in CONNACK, and
a QoS 2 PUBLISH is answered DISCONNECT 0x9B (QoS not supported); 3.x clients are disconnected. A PUBREC /
PUBREL / PUBCOMP from a client is a protocol error since the gateway never starts a QoS 2 exchange.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tb_gateway.mqtt.codec import DecodeError, Decoder, encode, puback, pubacks, varint
from tb_gateway.mqtt.packets import (
    MQTT_5,
    VERSIONS,
    Auth,
    ConnAck,
    ConnackV3,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PubAck,
    Publish,
    Reason,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)


class State(enum.Enum):
    AWAITING_CONNECT = "awaiting_connect"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class Limits:
    max_packet_bytes: int = 65536  # MAX_PAYLOAD_SIZE: ThingsBoard's decoder limit on one MQTT message
    max_topic_length: int = 1024  # longer topic names / filters are unknown ones, not worth matching
    max_inflight: int = 100  # QoS 1 PUBLISHes awaiting PUBACK; v5 clients are told (Receive Maximum)
    max_queued: int = 100  # packets held while the CONNECT is authenticated (ThingsBoard's limit)
    connect_timeout_s: float = 10.0  # accept -> CONNECT; an idle socket costs memory
    keepalive_factor: float = 1.5  # MQTT: the server closes after 1.5 x Keep Alive without a packet


# --- events (the Publish packet itself is the event for a received PUBLISH: it is the hot path) ----------


@dataclass(frozen=True, slots=True)
class ConnectReceived:
    connect: Connect


@dataclass(frozen=True, slots=True)
class Subscribed:
    granted: tuple[tuple[str, int], ...]  # accepted filters and their granted QoS


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    topic_filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PubAckReceived:
    packet_id: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    reason_code: int  # MQTT 5 reason (also used for 3.x, where it is only logged)
    detail: str
    by_peer: bool = False
    # what the peer did wrong, when it ended the session (counted by the adapter as a refusal reason):
    # "malformed", "too_large", "protocol_error", "qos_not_supported", "too_many_packets"; "" otherwise
    refusal: str = field(default="", compare=False)


_PROTOCOL = "protocol_error"

Event = ConnectReceived | Publish | Subscribed | Unsubscribed | PubAckReceived | ConnectionTerminated


# MQTT 5 reason codes a CONNACK may carry (spec table 3-1); shutdown becomes "server busy"
_CONNACK_CODES = frozenset({*range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F})


def _as_connack(reason_code: int) -> int:
    if reason_code in _CONNACK_CODES:
        return reason_code
    return Reason.SERVER_BUSY if reason_code == Reason.SERVER_SHUTTING_DOWN else Reason.UNSPECIFIED


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` (one level) and ``#`` (the rest)."""
    if topic_filter == topic:
        return True
    parts, levels = topic_filter.split("/"), topic.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(parts) == len(levels)


class Session:
    # slots: one per connection (smaller than a dict), and the C lane reads state, inflight, _decoder and _out
    # at every read (_mqtt_lane.c: a slot is a load through its attribute cache)
    __slots__ = (
        "_accept_filter",
        "_connect_deadline",
        "_decoder",
        "_last_received",
        "_next_packet_id",
        "_out",
        "_queued",
        "_window",
        "client_max_packet",
        "inflight",
        "keepalive_s",
        "last_packet_id",
        "limits",
        "state",
        "subscriptions",
        "version",
    )

    def __init__(self, limits: Limits, now: float, accept_filter: Callable[[str], bool]) -> None:
        self.limits = limits
        self.state = State.AWAITING_CONNECT
        self.version = 4
        self.keepalive_s = 0
        self.inflight = 0  # QoS 1 PUBLISHes received and not yet acknowledged
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.client_max_packet: int | None = None
        self._window: _Window | None = None  # only for a v5 client that set a Receive Maximum
        self._accept_filter = accept_filter
        self._decoder = Decoder(limits.max_packet_bytes)
        self._out: list[bytes] = []
        self._queued: list[Packet] = []
        self._last_received = now
        self._connect_deadline = now + limits.connect_timeout_s
        self._next_packet_id = 0
        self.last_packet_id = 0  # of the last downlink ``publish`` wrote (0 for QoS 0): matches its PUBACK

    # --- input ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.TERMINATED:
            return []
        self._last_received = now
        if self.state is State.CONNECTED and (packets := self._decoder.feed_one_publish(data)) is not None:
            self.inflight += len(packets)  # what _handle_all does with a plain QoS 1 PUBLISH
            return packets  # type: ignore[return-value]
        try:
            packets = self._decoder.feed(data)
        except DecodeError as exc:
            events = self._handle_all(exc.packets)
            if self._stopped():
                return events
            # ThingsBoard answers an oversize packet like a malformed one (spec §1.1)
            too_large = exc.reason_code == Reason.PACKET_TOO_LARGE
            code = Reason.MALFORMED_PACKET if too_large else exc.reason_code
            refusal = "too_large" if too_large else "malformed" if code == Reason.MALFORMED_PACKET else "protocol_error"
            events.append(self._terminate(code, str(exc), refusal))
            return events
        return self._handle_all(packets)

    def _handle_all(self, packets: list[Packet]) -> list[Event]:
        events: list[Event] = []
        connected = State.CONNECTED
        for packet in packets:
            # the hot path: a plain QoS 1 PUBLISH on a live session is its own event
            if (
                type(packet) is Publish
                and packet.qos == 1
                and not packet.properties
                and packet.topic  # an empty one is refused by _checked_publish
                and self.state is connected
            ):
                self.inflight += 1
                events.append(packet)
                continue
            if self._stopped():
                break
            events.extend(self._handle(packet))
        return events

    def _stopped(self) -> bool:
        return self.state is State.TERMINATED

    def _handle(self, packet: Packet) -> list[Event]:
        if self.state is State.CONNECTED:
            handler = _CONNECTED_HANDLERS.get(type(packet))
            if handler is None:
                return [self._terminate(Reason.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}", _PROTOCOL)]
            return handler(self, packet)
        if self.state is State.AWAITING_CONNECT:
            if type(packet) is not Connect:
                return [self._terminate(Reason.PROTOCOL_ERROR, "first packet is not CONNECT", _PROTOCOL)]
            return self._connect(packet)
        # AUTHENTICATING: hold everything until the CONNECT is answered
        if type(packet) is Connect:
            return [self._terminate(Reason.PROTOCOL_ERROR, "second CONNECT", _PROTOCOL)]
        if len(self._queued) >= self.limits.max_queued:
            return [self._terminate(Reason.QUOTA_EXCEEDED, "too many packets before CONNACK", "too_many_packets")]
        self._queued.append(packet)
        return []

    def _connect(self, packet: Connect) -> list[Event]:
        if packet.version not in VERSIONS:
            self._out.append(encode(ConnAck(ConnackV3.UNACCEPTABLE_PROTOCOL_VERSION), 4))
            return [self._terminated(Reason.UNSUPPORTED_PROTOCOL_VERSION, f"protocol level {packet.version}")]
        self.version = packet.version
        self.keepalive_s = packet.keepalive_s
        if self.version == MQTT_5:
            if 0x15 in packet.properties:  # enhanced authentication: not offered (no AUTH exchange)
                self.refuse(ConnackV3.NOT_AUTHORIZED, Reason.BAD_AUTHENTICATION_METHOD)
                return [self._terminated(Reason.BAD_AUTHENTICATION_METHOD, "authentication method given")]
            for prop, name in ((0x21, "Receive Maximum"), (0x27, "Maximum Packet Size")):
                if packet.properties.get(prop, 1) == 0:  # MQTT 5 §3.1.2.11.3-4: a Protocol Error
                    self.refuse(ConnackV3.NOT_AUTHORIZED, Reason.PROTOCOL_ERROR)
                    return [self._terminated(Reason.PROTOCOL_ERROR, f"{name} of 0", _PROTOCOL)]
            self.client_max_packet = packet.properties.get(0x27)
            if 0x21 in packet.properties:  # Receive Maximum: our QoS 1 PUBLISHes it may have unacknowledged
                self._window = _Window(packet.properties[0x21])
        self.state = State.AUTHENTICATING
        return [ConnectReceived(packet)]

    def _publish(self, packet: Publish) -> list[Event]:
        if packet.qos == 1:
            self.inflight += 1
            return [packet]
        if packet.qos == 2:
            return [self._terminate(Reason.QOS_NOT_SUPPORTED, "QoS 2 is not supported", "qos_not_supported")]
        if packet.properties and 0x23 in packet.properties:
            return [self._terminate(Reason.TOPIC_ALIAS_INVALID, "topic aliases are not supported", _PROTOCOL)]
        if not packet.topic:
            return [self._terminate(Reason.PROTOCOL_ERROR, "PUBLISH without a topic", _PROTOCOL)]
        return [packet]

    def _checked_publish(self, packet: Publish) -> list[Event]:
        if packet.properties and 0x23 in packet.properties:
            return [self._terminate(Reason.TOPIC_ALIAS_INVALID, "topic aliases are not supported", _PROTOCOL)]
        if not packet.topic:
            return [self._terminate(Reason.PROTOCOL_ERROR, "PUBLISH without a topic", _PROTOCOL)]
        return self._publish(packet)

    def _subscribe(self, packet: Subscribe) -> list[Event]:
        refused = Reason.TOPIC_FILTER_INVALID if self.version == MQTT_5 else 0x80
        codes = []
        granted = []
        for topic_filter, options in packet.subscriptions:
            if len(topic_filter) <= self.limits.max_topic_length and self._accept_filter(topic_filter):
                qos = min(options & 3, 1)
                self.subscriptions[topic_filter] = qos
                granted.append((topic_filter, qos))
                codes.append(qos)
            else:
                codes.append(refused)
        self._out.append(encode(SubAck(packet.packet_id, tuple(codes)), self.version))
        return [Subscribed(tuple(granted))] if granted else []

    def _unsubscribe(self, packet: Unsubscribe) -> list[Event]:
        codes = tuple(
            Reason.SUCCESS if self.subscriptions.pop(f, None) is not None else Reason.NO_SUBSCRIPTION_EXISTED
            for f in packet.topic_filters
        )
        self._out.append(encode(UnsubAck(packet.packet_id, codes), self.version))
        return [Unsubscribed(packet.topic_filters)]

    def _ping(self, packet: PingReq) -> list[Event]:
        self._out.append(b"\xd0\x00")
        return []

    def _puback(self, packet: PubAck) -> list[Event]:
        window = self._window
        if window is not None:
            self._out += window.acknowledged(packet.packet_id)
        return [PubAckReceived(packet.packet_id, packet.reason_code)]

    def _disconnect(self, packet: Disconnect) -> list[Event]:
        self.state = State.TERMINATED
        return [ConnectionTerminated(packet.reason_code, "client disconnected", by_peer=True)]

    def _auth(self, packet: Auth) -> list[Event]:
        return [self._terminate(Reason.PROTOCOL_ERROR, "AUTH without an authentication method", _PROTOCOL)]

    # --- commands from the adapter --------------------------------------------------------------------

    def accept(self, assigned_client_id: str | None = None) -> list[Event]:
        """CONNACK 0 (v5 with the limits the client must respect); returns events of packets held meanwhile."""
        if self.state is not State.AUTHENTICATING:
            return []
        props: dict[int, Any] = {}
        if self.version == MQTT_5:
            largest = self.limits.max_packet_bytes  # remaining length; the property counts the whole packet
            props = {0x21: self.limits.max_inflight, 0x24: 1, 0x27: 1 + len(varint(largest)) + largest}
            if assigned_client_id:
                props[0x12] = assigned_client_id
        self._out.append(encode(ConnAck(0, False, props), self.version))
        self.state = State.CONNECTED
        queued, self._queued = self._queued, []
        return self._handle_all(queued)

    def refuse(self, code_v3: int, code_v5: int) -> None:
        """CONNACK with the refusal code for the client's version, then close."""
        if self.state is State.TERMINATED:
            return
        code = code_v5 if self.version == MQTT_5 else code_v3
        self._out.append(encode(ConnAck(code), self.version))
        self.state = State.TERMINATED

    def acknowledge(self, packet_id: int, reason_code: int = 0) -> None:
        """PUBACK one QoS 1 PUBLISH (the adapter calls these in arrival order)."""
        if self.state is State.TERMINATED:
            return
        self.inflight -= 1
        self._out.append(puback(packet_id, reason_code, self.version))

    def acknowledge_delivered(self, packet_ids: list[int]) -> None:
        """PUBACK (success) a run of QoS 1 PUBLISHes in one go: the hot path, one ``struct.pack`` per run."""
        if self.state is State.TERMINATED or not packet_ids:
            return
        self.inflight -= len(packet_ids)
        self._out.append(pubacks(packet_ids))

    def acknowledge_delivered_now(self, packet_ids: list[int]) -> bytes:
        """``acknowledge_delivered`` then ``data_to_send`` in one call: the adapter's hot path."""
        if self.state is State.TERMINATED or not packet_ids:
            return self.data_to_send()
        self.inflight -= len(packet_ids)
        data = pubacks(packet_ids)
        out = self._out
        if out:  # what was queued before goes first
            out.append(data)
            data = b"".join(out)
            out.clear()
        return data

    def publish(self, topic: str, payload: bytes) -> bool:
        """Send a downlink: QoS of the first matching subscription, else 1 (spec §1.3). False if too large."""
        if self.state is not State.CONNECTED:
            return False
        qos = next((q for f, q in self.subscriptions.items() if topic_matches(f, topic)), 1)
        packet_id = 0
        if qos:
            self._next_packet_id = self._next_packet_id % 0xFFFF + 1
            packet_id = self._next_packet_id
        data = encode(Publish(topic, payload, qos, packet_id), self.version)
        if self.client_max_packet is not None and len(data) > self.client_max_packet:
            return False
        window = self._window
        if packet_id and window is not None and not window.take(packet_id):
            if len(window.held) >= MAX_HELD_DOWNLINKS:
                return False
            window.held.append((packet_id, data))  # goes out when the client acknowledges earlier ones
        else:
            self._out.append(data)
        self.last_packet_id = packet_id
        return True

    def close(self, reason_code: int, detail: str) -> ConnectionTerminated:
        """End the session from our side (takeover, shutdown, refusal of a message): v5 says why."""
        return self._terminate(reason_code, detail)

    # --- time -----------------------------------------------------------------------------------------

    def touch(self, now: float) -> None:
        """Count as heard from: the adapter calls it while it is itself not reading the socket."""
        self._last_received = now

    def deadline(self) -> float | None:
        if self.state is State.AWAITING_CONNECT:
            return self._connect_deadline
        if self.state is State.TERMINATED or not self.keepalive_s:
            return None
        return self._last_received + self.keepalive_s * self.limits.keepalive_factor

    def handle_timer(self, now: float) -> list[Event]:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        if self.state is State.AWAITING_CONNECT:
            return [self._terminated(Reason.MAXIMUM_CONNECT_TIME, "no CONNECT in time")]
        return [self._terminate(Reason.KEEP_ALIVE_TIMEOUT, "keep-alive expired")]

    # --- output ---------------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    @property
    def window_full(self) -> bool:
        return self.inflight >= self.limits.max_inflight

    def _terminate(self, reason_code: int, detail: str, refusal: str = "") -> ConnectionTerminated:
        """Queue the goodbye the peer's version allows (v5 DISCONNECT once connected) and stop."""
        if self.state is State.TERMINATED:
            return ConnectionTerminated(reason_code, detail, refusal=refusal)
        if self.version == MQTT_5 and self.state is not State.AWAITING_CONNECT:
            if self.state is State.AUTHENTICATING:  # not yet answered: the goodbye is a refusing CONNACK
                self._out.append(encode(ConnAck(_as_connack(reason_code)), MQTT_5))
            else:
                self._out.append(encode(Disconnect(reason_code), MQTT_5))
        return self._terminated(reason_code, detail, refusal)

    def _terminated(self, reason_code: int, detail: str, refusal: str = "") -> ConnectionTerminated:
        self.state = State.TERMINATED
        self._queued.clear()
        return ConnectionTerminated(reason_code, detail, refusal=refusal)


_CONNECTED_HANDLERS: dict[type, Callable[[Session, Any], list[Event]]] = {
    Publish: Session._checked_publish,
    Subscribe: Session._subscribe,
    Unsubscribe: Session._unsubscribe,
    PingReq: Session._ping,
    PubAck: Session._puback,
    Disconnect: Session._disconnect,
    Auth: Session._auth,
}


class Pending(Protocol):
    """What the ack queue needs of a pending answer (an asyncio future, without importing asyncio)."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


try:  # the C fast path for the PUBACKs due (setup.py builds it where a compiler is present)
    from tb_gateway._speedups import acks_delivered as _acks_delivered
except ImportError:  # pragma: no cover - AckQueue.pop_delivered does the same in Python
    _acks_delivered = None  # type: ignore[assignment]


MAX_HELD_DOWNLINKS = 1000  # downlinks waiting for a v5 client's Receive Maximum; beyond, publish() refuses


class _Window:
    """Our QoS 1 PUBLISHes a v5 client has not acknowledged yet: at most its Receive Maximum (MQTT 5 §3.3.4);
    the others wait here, in order, until PUBACKs free the window."""

    __slots__ = ("awaiting", "held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.awaiting: set[int] = set()
        self.held: deque[tuple[int, bytes]] = deque()

    def take(self, packet_id: int) -> bool:
        """True when ``packet_id`` may go out now (counted as awaiting); False: hold it."""
        if self.held or len(self.awaiting) >= self.limit:
            return False
        self.awaiting.add(packet_id)
        return True

    def acknowledged(self, packet_id: int) -> list[bytes]:
        """The client acknowledged ``packet_id``: what may go out now."""
        self.awaiting.discard(packet_id)
        released = []
        while self.held and len(self.awaiting) < self.limit:
            held_id, data = self.held.popleft()
            self.awaiting.add(held_id)
            released.append(data)
        return released


class AckQueue(deque[tuple[int, Any, float]]):
    """PUBACKs leave in arrival order: an answer that is ready waits for every earlier one (DESIGN.md §4).

    An entry is ``(packet_id, answer, received_at)``, added with ``append``; ``answer`` is final (an ``int``
    reason code) or ``Pending`` until it is done, and ``ready`` hands out its result then. A deque itself, so
    adding, ``len`` and truth cost no Python call: the connection asks them several times per read.
    """

    __slots__ = ()

    def ready(self) -> list[tuple[int, Any, float]]:
        """Pop the answers now due, in order."""
        entries = self
        due = []
        while entries:
            entry = entries[0]
            answer = entry[1]
            if type(answer) is not int:
                if not answer.done():
                    break
                entry = (entry[0], answer.result(), entry[2])
            entries.popleft()
            due.append(entry)
        return due

    def pop_delivered(self, delivered: Any) -> tuple[list[int], float]:
        """Pop the run of plain successes now due at the head: entries with a packet id whose answer is 0, or
        done with the result ``delivered``. Their packet ids, and ``received_at`` of the last (-1.0 when
        none); ``ready`` hands out whatever comes after. The hot path: in C when built (one call per run)."""
        if _acks_delivered is not None:
            return _acks_delivered(self, delivered)
        ids: list[int] = []
        received_at = -1.0
        while self:
            packet_id, answer, at = self[0]
            if not packet_id or not (
                answer == 0 if type(answer) is int else answer.done() and answer.result() is delivered
            ):
                break
            self.popleft()
            ids.append(packet_id)
            received_at = at
        return ids, received_at

    def head(self) -> Any:
        """The first answer still pending (after ``ready``), or None."""
        if self:
            answer = self[0][1]
            if type(answer) is not int:
                return answer
        return None
