"""The CoAP side of the downlink (spec §4): Observe on ``rpc`` and ``attributes``, RPC replies, client RPC.

- ``GET .../rpc`` with Observe 0 registers an observation (a ``DownlinkSession``): first answer **2.03
  Valid**, then one 2.05 notification ``{"id","method","params"}`` per RPC. A CON notification's ACK marks
  the RPC delivered; a NON one is delivered when sent. ``GET .../rpc`` without Observe is 4.00.
- ``GET .../attributes`` with Observe 0: first answer 2.05 with every current shared attribute, flat; then
  2.05 ``{"k":v,...,"deleted":[..]}`` per change. Without Observe it stays the attribute request.
- ``POST .../rpc/{id}``: the device's reply -> 2.01 (4.04 when no RPC with that id is pending).
- ``POST .../rpc`` ``{"method","params"}``: client-side RPC -> 2.05 with the backend's reply.
- A new observation of the same feature by the same device replaces the old one, and so does a new one with
  the same address and token (RFC 7641 §4.1), whatever its device or feature; GET Observe 1 (answered 2.02
  Deleted), a Reset or an unacknowledged notification ends it. An observation is not activity: only the
  requests are.
- A CON observation has at most ``max_notifications_in_flight`` notifications unacknowledged: beyond it an
  RPC is refused (it waits) and attribute changes are held, merged into one delta; an ACK that frees room
  offers the waiting RPCs again and sends the held delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from tb_gateway.coap.codec import Code, ContentFormat, Option, encode_uint
from tb_gateway.coap.endpoint import Exchange, NotificationAcknowledged, Observation, ObservationCancelled
from tb_gateway.downlink.client_rpc import parse_request
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.sessions import Delivery, Feature, RpcCall
from tb_gateway.errors import PayloadError
from tb_gateway.normalize import parse_json
from tb_gateway.records import DeviceIdentity, Transport

if TYPE_CHECKING:
    from tb_gateway.coap.server import CoapServer

COAP = Transport.COAP
_JSON = ((Option.CONTENT_FORMAT, encode_uint(ContentFormat.JSON)),)


class CoapObservation:
    """One registered observer of ``rpc`` or ``attributes``: the CoAP ``DownlinkSession``."""

    transport = COAP
    connection = False

    def __init__(self, side: CoapDownlink, device: DeviceIdentity, feature: Feature, observation: Observation) -> None:
        self.device = device
        self.feature = feature
        self.observation = observation
        self._side = side
        self.unacknowledged: dict[int, int] = {}  # notification message id -> RPC id
        self.refused = False  # an RPC was refused for a full window: offer the waiting ones at the next ACK
        self.held: dict[str, Any] | None = None  # attribute changes a full window kept back, as one delta

    def push_rpc(self, call: RpcCall) -> Delivery:
        mid = self._side.notify(self.observation, orjson.dumps(call.body()))
        if mid is None:
            self.refused = True
            return Delivery.REFUSED  # too many unacknowledged notifications: the RPC waits
        if not self.observation.confirmable:
            return Delivery.DELIVERED
        self.unacknowledged[mid] = call.id
        return Delivery.SENT

    def push_attributes(self, update: dict[str, Any]) -> None:
        # Updates are deltas: one the window cannot take now is kept, and later ones merge into it, so the
        # device ends up told of every change (and in order) once ACKs free the window.
        self.held = update if self.held is None else merge_updates(self.held, update)
        self.send_held()

    def send_held(self) -> None:
        if self.held is not None and self._side.notify(self.observation, orjson.dumps(self.held)) is not None:
            self.held = None

    def close(self, reason: str) -> None:
        self._side.end(self)


class CoapDownlink:
    def __init__(self, server: CoapServer, hub: Downlink) -> None:
        self._server = server
        self._hub = hub
        self._by_observation: dict[Observation, CoapObservation] = {}
        self._by_device: dict[tuple[str, Feature], CoapObservation] = {}

    # --- requests (handlers with the server's Handler signature) ---

    def observe(self, exchange: Exchange, device: DeviceIdentity, feature: Feature) -> None:
        hub = self._hub
        hub.activity(device, COAP)
        server = self._server
        if exchange.observe == 1:  # deregistration (the endpoint already ended the observation)
            server._answer(exchange, Code.DELETED)
            return
        if exchange.observe != 0:
            if feature is Feature.RPC:
                server.refuse(exchange, device, Code.BAD_REQUEST, "bad_request", b"GET rpc needs Observe")
            else:
                server.get_attributes(exchange, device)
            return
        previous = server.endpoint.observation(exchange.addr, exchange.token)
        observation = server.endpoint.observe(exchange)
        if previous is not None and previous is not observation:  # same token, another resource: replaced
            replaced = self._by_observation.get(previous)
            if replaced is not None:
                self.end(replaced)
        if observation is None:  # the endpoint's observer cap: answered without Observe, not registered
            server.api.refused(device, COAP, "max_observers")  # RFC 7641 §4.1
            self._first_answer(exchange, device, feature)
            return
        old = self._by_device.get((device.id, feature))
        if old is not None and old.observation is not observation:
            self.end(old)
        session = self._by_observation.get(observation)
        if session is None:
            session = CoapObservation(self, device, feature, observation)
            self._by_observation[observation] = session
            self._by_device[(device.id, feature)] = session
        else:
            session.held = None  # the registration's answer is the whole current set
        self._first_answer(exchange, device, feature)
        hub.attach(session)
        hub.subscribe(session, feature)  # pending RPCs go out now, after the registration's answer

    def _first_answer(self, exchange: Exchange, device: DeviceIdentity, feature: Feature) -> None:
        """2.03 for rpc, every current shared attribute (flat) for attributes; with Observe if registered."""
        if feature is Feature.RPC:
            self._server._answer(exchange, Code.VALID)
        else:
            snapshot = orjson.dumps(self._hub.shared_snapshot(device.id))
            self._server._answer(exchange, Code.CONTENT, snapshot, _JSON)

    def rpc_reply(self, exchange: Exchange, device: DeviceIdentity) -> None:
        self._hub.activity(device, COAP)
        try:
            rpc_id = int(exchange.path[4])
        except ValueError:
            self._server.refuse(exchange, device, Code.BAD_REQUEST, "bad_request", b"request id must be an integer")
            return
        if self._hub.rpc_replied(device.id, rpc_id, exchange.payload):
            self._server._answer(exchange, Code.CREATED)
        else:
            self._server.refuse(exchange, device, Code.NOT_FOUND, "not_found")

    def client_rpc(self, exchange: Exchange, device: DeviceIdentity) -> None:
        self._hub.activity(device, COAP)
        try:
            method, params = parse_request(parse_json(exchange.payload))
        except PayloadError as exc:
            self._server.refuse(exchange, device, Code.BAD_REQUEST, "bad_payload", str(exc).encode()[:256])
            return
        reply = self._hub.client_rpc(device, COAP, method, params)
        reply.add_done_callback(
            lambda done: self._server._answer(exchange, Code.CONTENT, orjson.dumps(done.result()), _JSON)
        )

    # --- endpoint events ---

    def acknowledged(self, event: NotificationAcknowledged) -> None:
        session = self._by_observation.get(event.observation)
        if session is None:
            return
        rpc_id = session.unacknowledged.pop(event.mid, None)
        if rpc_id is not None:
            self._hub.rpc_delivered(session.device.id, rpc_id)
        # the window has room again: what waited for it goes now
        session.send_held()
        if session.refused:
            session.refused = False
            self._hub.ready(session)

    def cancelled(self, event: ObservationCancelled) -> None:
        session = self._by_observation.get(event.observation)
        if session is not None:
            self.end(session)

    # --- inside ---

    def notify(self, observation: Observation, payload: bytes) -> int | None:
        server = self._server
        assert server._loop is not None
        if not observation.active:
            return None
        mid = server.endpoint.notify(observation, server._loop.time(), Code.CONTENT, payload, _JSON)
        server._schedule_flush()
        return mid

    def end(self, session: CoapObservation) -> None:
        self._server.endpoint.cancel_observation(session.observation)
        self._by_observation.pop(session.observation, None)
        key = (session.device.id, session.feature)
        if self._by_device.get(key) is session:
            del self._by_device[key]
        self._hub.detach(session)


def merge_updates(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Two shared-attribute deltas ``{"k": v, ..., "deleted": [..]}`` as one: the later change of a key wins
    (set after deleted is set, deleted after set is deleted). Neither argument is changed: the hub hands the
    same update to every session."""
    merged = {key: value for key, value in older.items() if key != "deleted"}
    deleted = [key for key in older.get("deleted", ()) if key not in newer]
    for key, value in newer.items():
        if key != "deleted":
            merged[key] = value
    for key in newer.get("deleted", ()):
        merged.pop(key, None)
        if key not in deleted:
            deleted.append(key)
    if deleted:
        merged["deleted"] = deleted
    return merged
