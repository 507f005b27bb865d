"""The MQTT listener (plain and TLS): one ``asyncio.Protocol`` per connection around the sans-IO ``Session``.

Per read: feed the session, act on its events through ``DeviceApi`` only, then write everything due (PUBACKs,
answers) in one ``transport.write``. A QoS 1 PUBLISH is acknowledged only once the pipeline future resolved
DELIVERED, and PUBACKs leave in arrival order (``AckQueue``); futures resolved in the same loop turn are
answered together. MQTT 5 refusals are PUBACK reason codes, 3.x refusals close the connection, exactly where
earlier messages have been answered (docs/mqtt.md has the table).

Nothing is buffered without bound: reading pauses while the CONNECT is authenticated, while the in-flight
window is full, while the pipeline lacks room, and while the peer is not reading what we write.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from pathlib import Path
from typing import Any, cast

import orjson

from tb_gateway.auth import AccessToken, MqttBasic
from tb_gateway.device_api import DeviceApi, json_error
from tb_gateway.errors import AddressBlocked, ConfigError, CredentialsUnavailable, PayloadError
from tb_gateway.logs import Throttle
from tb_gateway.mqtt import topics
from tb_gateway.mqtt.downlink import MqttDownlink
from tb_gateway.mqtt.packets import MQTT_5, Connect, Publish
from tb_gateway.mqtt.session import (
    AckQueue,
    ConnectionTerminated,
    ConnectReceived,
    Limits,
    Session,
    State,
)
from tb_gateway.mqtt.topics import Action, Target
from tb_gateway.pipeline import Ticket, when_settled
from tb_gateway.records import DeviceIdentity, Transport
from tb_gateway.sinks.base import Outcome

try:  # the MQTT lane and the connection state it reads on every read, in C (_mqtt_lane.c)
    from tb_gateway._speedups import FastMqttConnection as _Base
    from tb_gateway._speedups import MqttLane
except ImportError:  # pragma: no cover - built without a C compiler: every read takes the general path
    MqttLane = None  # type: ignore[misc,assignment]

    class _Base:  # type: ignore[no-redef]
        """Without the C extension: the connection's own attributes, and every read goes to ``_read``."""

        __slots__ = (
            "_acks",
            "_api",
            "_backlog",
            "_closing",
            "_codes",
            "_device",
            "_downlink",
            "_drained",
            "_lane",
            "_loop",
            "_paused",
            "_read_at",
            "_read_ms",
            "_sampled",
            "_server",
            "_session",
            "_transport",
            "_v5",
            "_watching",
        )

        def data_received(self, data: bytes) -> None:
            connection = cast("MqttConnection", self)
            connection._api.pipeline.poll()  # answers whose batch is durable go out now
            connection._read(data)

        def _settled(self, future: Any) -> None:
            cast("MqttConnection", self)._settle(future)


log = logging.getLogger(__name__)

MQTT = Transport.MQTT
LATENCY_SAMPLE = 8  # ack latency is observed for one message in 8: an observation costs as much as a decode
ROOM_HEADROOM = 1024  # stop reading while fewer queue slots are free, so one read rarely overflows the queue
# (at most a tenth of QUEUE_MAX_RECORDS, so a small queue still admits)

# why reading is paused (a bit each; reading resumes when none is left)
AUTH, WINDOW, ROOM, WRITE, CLOSING = 1, 2, 4, 8, 16

# MQTT 5 reason codes as plain ints (the ack queue tells answers apart by type); negative = close with it
OK, UNSPECIFIED, IMPLEMENTATION, NOT_AUTHORIZED_ = 0x00, 0x80, 0x83, 0x87
SERVER_BUSY, SHUTTING_DOWN, TAKEN_OVER, TOPIC_INVALID = 0x89, 0x8B, 0x8E, 0x90
QUOTA, PAYLOAD_INVALID = 0x97, 0x99
RATE_TOO_HIGH, CONNECTION_RATE = 0x96, 0x9F  # rate limit, blocked address (docs/scale-out.md)

_OUTCOME_V5 = {
    Outcome.DELIVERED: OK,
    Outcome.QUEUE_FULL: QUOTA,
    Outcome.SPOOL_FULL: QUOTA,
    Outcome.REJECTED: UNSPECIFIED,
    Outcome.SINK_FAILED: UNSPECIFIED,
    Outcome.SHUTTING_DOWN: -SHUTTING_DOWN,
    Outcome.RATE_LIMITED: RATE_TOO_HIGH,  # QoS 1; QoS 0 gets DISCONNECT 0x96 (_publish)
}
_FIXED = topics.FIXED
_POST = Action.POST
_DELIVERED = Outcome.DELIVERED
_CONNECTED = State.CONNECTED
_OUTCOME_V3 = {outcome: -abs(code) if code else OK for outcome, code in _OUTCOME_V5.items()}
# an outcome added later and not mapped here: MQTT 5 PUBACK 0x80, 3.x close (refused, never silently)
for _outcome in Outcome:
    _OUTCOME_V5.setdefault(_outcome, UNSPECIFIED)
    _OUTCOME_V3.setdefault(_outcome, -UNSPECIFIED)


def ssl_context(settings: Any) -> ssl.SSLContext:
    """Server context from MQTT_SSL_CERT_FILE / MQTT_SSL_KEY_FILE; TLS 1.2 at least, as ThingsBoard."""
    cert, key = settings.mqtt_ssl_cert_file, settings.mqtt_ssl_key_file
    if cert is None or key is None:
        raise ConfigError(["MQTT_SSL_ENABLED: needs MQTT_SSL_CERT_FILE and MQTT_SSL_KEY_FILE"])
    missing = [
        f"{name}: no such file: {path}"
        for name, path in (("MQTT_SSL_CERT_FILE", cert), ("MQTT_SSL_KEY_FILE", key))
        if not Path(path).is_file()
    ]
    if missing:  # which one: load_cert_chain's ENOENT does not say
        raise ConfigError(missing)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"MQTT_SSL_CERT_FILE / MQTT_SSL_KEY_FILE: cannot load: {exc}"]) from None
    return context


class MqttServer:
    name = "mqtt"

    def __init__(self, api: DeviceApi, tls: ssl.SSLContext | None = None) -> None:
        s = api.settings
        self.api = api
        self.settings = s
        self.limits = Limits(
            max_packet_bytes=s.max_payload_size,
            max_topic_length=s.mqtt_max_topic_length,
            max_inflight=s.mqtt_max_inflight,
            connect_timeout_s=s.mqtt_connect_timeout_seconds,
        )
        self._tls = tls
        self._listeners: list[asyncio.Server] = []
        self.connections: set[MqttConnection] = set()
        self.sessions: dict[str, MqttConnection] = {}  # device id -> its one live connection
        self.session_count = 0  # connections past CONNECT: what MQTT_MAX_CONNECTIONS bounds
        self.draining = False
        self._room_waiters: set[MqttConnection] = set()
        self._room_task: asyncio.Task[None] | None = None
        self.devices_connected = api.metrics.devices_connected.labels(transport=MQTT.value)
        self.accepted = api.metrics.connections.labels(transport=MQTT.value)
        self.latency = api.metrics.ack_latency.labels(transport=MQTT.value)
        self.auth_log = Throttle(log, period_s=60.0)
        self.headroom = max(1, min(ROOM_HEADROOM, s.queue_max_records // 10))
        self.lane = (
            None
            if MqttLane is None
            else MqttLane(
                api,
                MQTT,
                {topic.encode(): target.kind for topic, target in _FIXED.items() if target.action is _POST},
                Outcome,
                _DELIVERED,
                Ticket,
                when_settled,
                _CONNECTED,
                self.latency,
                PayloadError,
                self.limits.max_packet_bytes,
                self.headroom,
                self.limits.max_inflight,
                LATENCY_SAMPLE,
            )
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        shared = s.workers > 1  # WORKERS: every worker binds the ports (SO_REUSEPORT, docs/scale-out.md)
        plain = await loop.create_server(
            lambda: MqttConnection(self, loop), s.mqtt_bind_address, s.mqtt_bind_port, backlog=4096, reuse_port=shared
        )
        self._listeners.append(plain)
        if s.mqtt_ssl_enabled:
            tls = self._tls or ssl_context(s)
            secure = await loop.create_server(
                lambda: MqttConnection(self, loop),
                s.mqtt_bind_address,
                s.mqtt_ssl_bind_port,
                ssl=tls,
                # a client that never completes its handshake gets no longer than one that never sends CONNECT
                # (asyncio's default is 60 s: a slowloris opening on the TLS port)
                ssl_handshake_timeout=s.mqtt_connect_timeout_seconds,
                backlog=4096,
                reuse_port=shared,
            )
            self._listeners.append(secure)
        log.info("MQTT listening on %s", ", ".join(f"{s.mqtt_bind_address}:{p}" for p in self.ports))

    @property
    def ports(self) -> list[int]:
        """Bound ports, plain first (tests bind port 0)."""
        return [listener.sockets[0].getsockname()[1] for listener in self._listeners if listener.sockets]

    def stop_accepting(self) -> None:
        for listener in self._listeners:
            listener.close()

    async def drain(self) -> None:
        """Stop reading, answer every admitted message, then say goodbye (v5 DISCONNECT 0x8B) and close."""
        self.draining = True
        try:
            waits = [connection.begin_drain() for connection in list(self.connections)]
            await asyncio.gather(*waits)
        finally:
            for connection in list(self.connections):
                connection.shut(SHUTTING_DOWN, "server shutting down")
            if self._room_task is not None:
                self._room_task.cancel()
            for listener in self._listeners:
                await listener.wait_closed()

    def wait_for_room(self, connection: MqttConnection) -> None:
        self._room_waiters.add(connection)
        if self._room_task is None:
            self._room_task = asyncio.get_running_loop().create_task(self._resume_when_room())

    async def _resume_when_room(self) -> None:
        """One task for all the connections that stopped reading for lack of pipeline room."""
        pipeline = self.api.pipeline
        try:
            while self._room_waiters:
                while not (pipeline.has_room(self.headroom) or pipeline.closing):
                    if pipeline.has_room():
                        await asyncio.sleep(0.001)  # some room: let the batcher take more first
                    else:
                        await pipeline.wait_for_room()
                waiters, self._room_waiters = self._room_waiters, set()
                for connection in waiters:
                    connection.room_available()  # may wait again: then it is in the new set
                await asyncio.sleep(0)
        finally:
            self._room_task = None


class MqttConnection(_Base, asyncio.Protocol):
    """One client connection. ``data_received`` and ``_settled`` are the C base's (the MQTT lane, which hands
    everything else to ``_read`` and ``_settle``); the state they read (session, ack queue, device, flags) is
    its member slots."""

    __slots__ = ("_address", "_auth_task", "_counted", "_timer")
    # the C base's member slots, as this class uses them
    _lane: Any
    _server: MqttServer
    _api: DeviceApi
    _loop: asyncio.AbstractEventLoop
    _transport: asyncio.Transport | None
    _session: Session
    _acks: AckQueue
    _device: DeviceIdentity | None
    _codes: dict[Outcome, int]
    _watching: Any
    _backlog: deque[Any] | None
    _downlink: MqttDownlink | None
    _drained: asyncio.Future[None] | None

    def __init__(self, server: MqttServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._lane = server.lane
        self._api = server.api
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._address: str | None = None  # the peer's, for brute-force protection
        self._session = Session(server.limits, loop.time(), topics.accept_filter)
        self._acks = AckQueue()
        self._device: DeviceIdentity | None = None
        self._codes = _OUTCOME_V3
        self._v5 = False
        self._paused = 0
        self._closing = False  # a close is queued behind earlier answers: read and act on nothing more
        self._watching: Any = None  # the pending answer at the head of the ack queue, with our callback on it
        self._counted = False
        self._sampled = 0
        self._timer: asyncio.TimerHandle | None = None
        self._auth_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._backlog: deque[Any] | None = None  # events held while the pipeline has no room
        self._downlink: MqttDownlink | None = None  # RPC and shared attributes (mqtt/downlink.py)
        self._read_at = -1.0  # loop time of the read whose wall-clock time is _read_ms
        self._read_ms = 0

    # --- asyncio callbacks ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        peer = transport.get_extra_info("peername")
        self._address = peer[0] if peer else None
        self._server.connections.add(self)
        self._server.accepted.inc()
        self._arm_timer()

    def _read(self, data: bytes) -> None:
        """A read the lane did not take (``data_received`` polled the pipeline first: answers whose batch is
        durable go out now, not at the end of this pass)."""
        now = self._loop.time()
        events = self._session.receive_data(data, now)
        if self._downlink is not None:  # every read is activity, PINGREQ included (one call per read)
            self._read_at = now
            self._read_ms = self._api.now_ms()  # _publish stamps this read's records with the same reading
            self._downlink.activity(self._read_ms)
        self._admit(events, now)
        self._flush()

    def _admit(self, events: list[Any], now: float) -> None:
        """Act on what one read brought (or what was held until the CONNACK), in order."""
        if self._backlog is None and self._api.pipeline.has_room(len(events) + self._server.headroom):
            for event in events:  # the common case: room for everything
                if type(event) is Publish:
                    if not self._closing:
                        self._publish(event, now)
                else:
                    self._event(event)
        else:
            # the pipeline is (nearly) full: hold these, at most one read's worth (or what may wait for the
            # CONNACK), and read no more until they are admitted; no message is refused for lack of room
            if self._backlog is None:
                self._backlog = deque(events)
            else:
                self._backlog.extend(events)
            self._work_backlog(now)

    def _event(self, event: object) -> None:
        if type(event) is ConnectReceived:
            self._connect(event.connect)
        elif type(event) is ConnectionTerminated:
            if event.refusal:  # the client broke the protocol: counted and logged like any refusal
                self._api.refused(self._device, MQTT, event.refusal, event.detail)
            else:
                log.debug("MQTT connection ended: %s (0x%02x)", event.detail, event.reason_code)
        elif self._downlink is not None:  # Subscribed / Unsubscribed / PubAckReceived
            self._downlink.event(event)

    def _work_backlog(self, now: float) -> None:
        backlog = self._backlog
        pipeline = self._api.pipeline
        while backlog:
            event = backlog[0]
            if type(event) is Publish:
                if not pipeline.has_room() and not pipeline.closing:
                    self._pause(ROOM)
                    self._server.wait_for_room(self)
                    return
                backlog.popleft()
                if not self._closing:
                    self._publish(event, now)
            else:
                backlog.popleft()
                self._event(event)
        self._backlog = None

    def room_available(self) -> None:
        """The pipeline has room again: admit what was held, then read again if all of it went in."""
        if self._transport is None:
            return
        if self._backlog is not None:
            self._work_backlog(self._loop.time())
        if self._backlog is None:
            self.resume(ROOM)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        self._transport = None
        server.connections.discard(self)
        server._room_waiters.discard(self)
        device = self._device
        if device is not None and server.sessions.get(device.id) is self:
            del server.sessions[device.id]
            server.devices_connected.dec()
        if self._counted:
            server.session_count -= 1
            self._counted = False
        if self._timer is not None:
            self._timer.cancel()
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._acks.clear()
        self._backlog = None
        if self._downlink is not None:
            self._downlink.ended()  # the device's disconnect, unless it has another connection
            self._downlink = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._pause(WRITE)

    def resume_writing(self) -> None:
        self.resume(WRITE)

    # --- CONNECT ----------------------------------------------------------------------------------------

    def _connect(self, connect: Connect) -> None:
        self._v5 = connect.version == MQTT_5
        self._codes = _OUTCOME_V5 if self._v5 else _OUTCOME_V3
        server = self._server
        if server.draining:
            self._session.refuse(0x03, SERVER_BUSY)
            return
        if server.session_count >= server.settings.mqtt_max_connections:
            self._api.refused(None, MQTT, "max_connections")
            self._session.refuse(0x03, QUOTA)
            return
        server.session_count += 1
        self._counted = True
        self._pause(AUTH)
        self._auth_task = self._loop.create_task(self._authenticate(connect))

    async def _authenticate(self, connect: Connect) -> None:
        refusal = topics.auth_refusal(connect)
        device: DeviceIdentity | None = None
        try:
            device = await self._identify(connect)
        except AddressBlocked:  # counted and logged by the auth service; "connection rate exceeded", then close
            self._api.refused(None, MQTT, "address_blocked")
            self._auth_task = None
            if self._transport is not None:
                self._session.refuse(0x03, CONNECTION_RATE)
                self._flush()
            return
        except CredentialsUnavailable as exc:
            refusal = topics.auth_refusal(connect, unavailable=True)
            log.warning("MQTT CONNECT refused, credentials cannot be checked now: %s", exc)
        except Exception:
            refusal = topics.auth_refusal(connect, unavailable=True)
            log.exception("MQTT CONNECT refused: authentication failed unexpectedly")
            self._api.metrics.errors.labels(component="mqtt").inc()
        self._auth_task = None
        if self._transport is None:
            return
        if device is None:
            self._server.auth_log.warning(
                ("auth", connect.username or connect.client_id),
                "MQTT CONNECT refused (0x%02x): client id %r, user name %r",
                refusal[1] if self._v5 else refusal[0],
                connect.client_id,
                connect.username,
            )
            self._session.refuse(*refusal)
        else:
            self._accept(device, connect)
        self._flush()

    async def _identify(self, connect: Connect) -> DeviceIdentity | None:
        """Spec §1.2: the user name as an access token, or MQTT basic credentials.

        Both are tried, the likelier first (a token device rarely sends both a client id and a password), so a
        known device usually costs one lookup and counts no authentication failure.
        """
        api = self._api
        username = connect.username or ""
        password = (connect.password or b"").decode(errors="surrogateescape")
        basic = MqttBasic(connect.client_id, username, password)
        if not username:
            return await api.authenticate(basic if connect.client_id else AccessToken(""), MQTT, self._address)
        token = AccessToken(username)
        likely_token = connect.password is None or not connect.client_id
        first, second = (token, basic) if likely_token else (basic, token)
        return await api.authenticate(first, MQTT, self._address, fallback=second)  # one attempt, both forms

    def _accept(self, device: DeviceIdentity, connect: Connect) -> None:
        server = self._server
        old = server.sessions.get(device.id)
        if old is None:
            server.devices_connected.inc()
        server.sessions[device.id] = self
        self._device = device
        if old is not None and old is not self:
            log.info("MQTT session of device %s taken over by a new connection", device.name)
            old.shut(TAKEN_OVER, "session taken over")
        log.debug("MQTT device %s connected (protocol level %d)", device.name, connect.version)
        assigned = device.id if self._v5 and not connect.client_id else None
        events = self._session.accept(assigned)
        if self._api.downlink is not None:
            self._downlink = MqttDownlink(self, device, self._api.downlink)
            self._api.downlink.attach(self._downlink)  # the device's connect
        self.resume(AUTH)
        self._admit(events, self._loop.time())  # what arrived before the CONNACK: a SUBSCRIBE reaches the downlink
        self._arm_timer()

    # --- PUBLISH ----------------------------------------------------------------------------------------

    def _publish(self, packet: Publish, now: float) -> None:
        target = _FIXED.get(packet.topic) or topics.route(packet.topic, self._server.limits.max_topic_length)
        if target.action is _POST:
            try:
                if now != self._read_at:  # one wall-clock reading per read, not per message
                    self._read_at = now
                    self._read_ms = self._api.now_ms()
                answer: Any = self._api.post(
                    self._device,  # type: ignore[arg-type]
                    target.kind,  # type: ignore[arg-type]
                    packet.payload,
                    MQTT,
                    self._read_ms,
                    activity_seen=self._downlink is not None,  # data_received reported this read
                )
            except PayloadError:
                self._bad_payload(packet.packet_id, packet.qos, now)  # counted and logged by post
                return
            if packet.qos:
                if type(answer) is Outcome:
                    answer = self._codes[answer]  # refused at once: post counted it
                self._acks.append((packet.packet_id, answer, now))
            elif answer is Outcome.RATE_LIMITED:  # QoS 0 has no PUBACK to say it: v5 DISCONNECT 0x96, 3.x close
                self._acks.append((0, -RATE_TOO_HIGH, now))
                self._closing = True
                self._pause(CLOSING)
            return
        _ACTIONS[target.action](self, packet, target, now)

    def _bad_payload(self, packet_id: int, qos: int, now: float) -> None:
        """Spec §1.15: v5 PUBACK 0x99 (QoS 0: DISCONNECT 0x99); 3.x close, after the earlier PUBACKs."""
        if self._v5 and qos:
            self._acks.append((packet_id, PAYLOAD_INVALID, now))
        else:
            self._acks.append((packet_id, -PAYLOAD_INVALID, now))
            self._closing = True
            self._pause(CLOSING)

    def _refuse_payload(self, packet: Publish, now: float, detail: str) -> None:
        self._api.refused(self._device, MQTT, "bad_payload", detail)
        self._bad_payload(packet.packet_id, packet.qos, now)

    def _unknown(self, packet: Publish, target: Target, now: float) -> None:
        """Spec §1.15: v5 PUBACK 0x90; 3.x a plain PUBACK; the message is dropped (and counted)."""
        self._api.refused(self._device, MQTT, "unknown_topic", packet.topic[:128])
        if packet.qos:
            self._acks.append((packet.packet_id, TOPIC_INVALID if self._v5 else OK, now))

    def _protobuf(self, packet: Publish, target: Target, now: float) -> None:
        self._refuse_payload(packet, now, f"{packet.topic[:128]}: protobuf payloads are not supported")

    def _attribute_request(self, packet: Publish, target: Target, now: float) -> None:
        assert self._device is not None
        try:
            if target.request_id < 0:
                raise PayloadError(f"{packet.topic[:128]}: the request id must be a decimal integer")
            client_keys, shared_keys = topics.attribute_request(packet.payload)
        except PayloadError as exc:
            self._refuse_payload(packet, now, str(exc))
            return
        answer = self._api.attribute_request(self._device, client_keys, shared_keys)
        self._session.publish(f"{target.response_prefix}{target.request_id}", orjson.dumps(answer))
        if packet.qos:
            self._acks.append((packet.packet_id, OK, now))

    def _client_rpc(self, packet: Publish, target: Target, now: float) -> None:
        """``getSessionLimits`` is answered here (spec §1.9); other methods get an error until forwarding lands."""
        try:
            if target.request_id < 0:
                raise PayloadError(f"{packet.topic[:128]}: the request id must be a decimal integer")
            method, _params = topics.client_rpc(packet.payload)
        except PayloadError as exc:
            self._refuse_payload(packet, now, str(exc))
            return
        topic = f"{target.response_prefix}{target.request_id}"
        hub = self._api.downlink
        if method == "getSessionLimits" or hub is None:
            body = None
            if method == "getSessionLimits":  # here, not through the hub: the answer goes out in this write
                self._api.metrics.client_rpc.labels(result="local").inc()
                body = orjson.dumps(self._api.session_limits())
            self._session.publish(topic, body or json_error(f"unsupported client-side RPC method: {method}"))
        else:  # to the backend; the answer (or {"error":"timeout"}) goes out on the response topic
            assert self._device is not None
            reply = hub.client_rpc(self._device, MQTT, method, _params)
            reply.add_done_callback(lambda done: self.send_downlink(topic, orjson.dumps(done.result())))
        if packet.qos:
            self._acks.append((packet.packet_id, OK, now))

    def _rpc_response(self, packet: Publish, target: Target, now: float) -> None:
        """The device's reply to a server-side RPC (spec §1.8); acknowledged even when nothing waits for it."""
        if target.request_id < 0:  # as for every request id (docs/mqtt.md): an invalid payload
            self._refuse_payload(packet, now, f"{packet.topic[:128]}: the request id must be a decimal integer")
            return
        hub = self._api.downlink
        if hub is None or self._device is None:
            log.debug("MQTT RPC response on %s matches no request", packet.topic[:128])
        elif not hub.rpc_replied(self._device.id, target.request_id, packet.payload):
            log.debug("MQTT RPC response on %s matches no pending request", packet.topic[:128])
        if packet.qos:
            self._acks.append((packet.packet_id, OK, now))

    def send_downlink(self, topic: str, payload: bytes) -> int | None:
        """Write a downlink PUBLISH now; its packet id (0 for QoS 0), or None when it cannot be sent."""
        if self._transport is None or self._closing or not self._session.publish(topic, payload):
            return None
        self._flush()
        return self._session.last_packet_id

    # --- answers, backpressure, timers -------------------------------------------------------------------

    def _settle(self, future: Any) -> None:
        """The head of the ack queue resolved; the rest of its batch usually has too: answer them all (what
        the C base's ``_settled`` does not answer itself: it takes the hot path below, in C).

        Only the watched head's own callback may clear ``_watching``: clearing it from any other callback let
        ``_flush`` watch the same head twice, and each extra callback watched the next head again, so under
        a steady unpipelined stream callbacks multiplied (3.3 per message, measured) and cost more CPU than
        the messages themselves.

        The common case is answered right here: reading not paused and nothing due but plain successes, so
        one C call pops the run and one write sends its PUBACKs (``_flush`` would take eight calls more; a
        device sending one message at a time pays this per message). Anything else goes through ``_flush``."""
        if future is not self._watching:
            return
        self._watching = None
        transport, session = self._transport, self._session
        if self._paused or transport is None or self._drained is not None or session.state is not _CONNECTED:
            self._flush()
            return
        # the hot path: a run of plain successes is due and nothing else; answer it in one write
        acks = self._acks
        delivered, received_at = acks.pop_delivered(_DELIVERED)
        head = None
        if acks:
            head = acks[0][1]
            if type(head) is int or head.done():  # more than plain successes is due: the general way
                self._answer_due(delivered, received_at)
                self._flush()
                return
        if delivered:
            self._sampled += len(delivered)
            if self._sampled >= LATENCY_SAMPLE:
                self._sampled = 0
                self._server.latency.observe(self._loop.time() - received_at)
            transport.write(session.acknowledge_delivered_now(delivered))
        if head is not None:  # the next answer, still pending
            self._watching = head
            when_settled(head, self._settled)

    def _flush(self) -> None:
        """Write every answer now due, in one write; then close or apply backpressure as the state says.

        Only the head of the ack queue is watched (one callback per batch, not per message): no PUBACK can
        leave before it anyway.
        """
        transport = self._transport
        if transport is None:
            return
        session = self._session
        acks = self._acks
        if acks:
            head = acks[0][1]  # an int answer is final, a future may be pending (acks.head(), without the call)
            if type(head) is int or head.done():  # else nothing is due: PUBACKs leave in order
                self._answer_due(*acks.pop_delivered(_DELIVERED))
                head = acks.head()
            if head is not None and head is not self._watching:
                self._watching = head
                when_settled(head, self._settled)
        out = session.data_to_send()
        if out:
            transport.write(out)
        if session.state is State.TERMINATED:
            transport.close()
            return
        if session.window_full:
            self._pause(WINDOW)
        elif self._paused & WINDOW:
            self.resume(WINDOW)
        if not self._paused & ROOM and not self._api.pipeline.has_room(self._server.headroom):
            self._pause(ROOM)
            self._server.wait_for_room(self)
        if self._drained is not None and not self._acks and not self._drained.done():
            self._drained.set_result(None)

    def _answer_due(self, delivered: list[int], received_at: float) -> None:
        """Answer what is due, given the run of plain successes just popped off the head of the ack queue
        (``AckQueue.pop_delivered``: the common case, one call per run)."""
        session = self._session
        acks = self._acks
        if delivered:
            self._sampled += len(delivered)
            if self._sampled >= LATENCY_SAMPLE:
                self._sampled = 0
                self._server.latency.observe(self._loop.time() - received_at)
            if not acks or ((head := acks.head()) is not None and not head.done()):  # nothing due behind it
                session.acknowledge_delivered(delivered)
                return
        for packet_id, answer, received_at in acks.ready():
            if type(answer) is not int:  # the Outcome of a resolved future
                if answer is not Outcome.DELIVERED:
                    assert self._device is not None
                    self._api.settle(self._device, MQTT, answer)
                answer = self._codes[answer]
            if answer == 0 and packet_id:
                delivered.append(packet_id)
                self._sampled += 1
                if self._sampled >= LATENCY_SAMPLE:
                    self._sampled = 0
                    self._server.latency.observe(self._loop.time() - received_at)
                continue
            session.acknowledge_delivered(delivered)
            delivered = []
            if answer < 0:
                session.close(-answer, "message refused")
                self._acks.clear()
                return
            if packet_id:
                session.acknowledge(packet_id, answer)
        session.acknowledge_delivered(delivered)

    def _pause(self, why: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= why

    def resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._session.deadline()
        if deadline is not None and self._transport is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        if self._paused & ~WRITE and self._session.state is State.CONNECTED:
            # we are the ones not reading: the client's PINGREQs may be waiting in the socket. Not when the
            # only reason is the client not reading our answers: then its keep-alive runs (else it would
            # hold its session for as long as TCP keeps the connection)
            self._session.touch(self._loop.time())
        elif self._session.handle_timer(self._loop.time()):
            log.debug("MQTT connection closed: no CONNECT or keep-alive expired")
            self._flush()
            return
        self._arm_timer()

    def shut(self, reason_code: int, detail: str) -> None:
        """Close from our side (takeover, shutdown): v5 clients get a DISCONNECT saying why."""
        if self._transport is None:
            return
        self._session.close(reason_code, detail)
        self._acks.clear()
        self._flush()

    def begin_drain(self) -> asyncio.Future[None]:
        self._pause(CLOSING)
        self._drained = self._loop.create_future()
        if not self._acks or self._transport is None:
            self._drained.set_result(None)
        return self._drained


_ACTIONS = {
    Action.UNKNOWN: MqttConnection._unknown,
    Action.PROTOBUF: MqttConnection._protobuf,
    Action.ATTRIBUTE_REQUEST: MqttConnection._attribute_request,
    Action.CLIENT_RPC: MqttConnection._client_rpc,
    Action.RPC_RESPONSE: MqttConnection._rpc_response,
}
