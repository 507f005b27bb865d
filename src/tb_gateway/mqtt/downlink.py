"""The MQTT side of the downlink (spec §1.7-§1.9, §1.13): one ``DownlinkSession`` per accepted connection.

- SUBSCRIBE ``v1/devices/me/rpc/request/+`` (or ``v2/r/req/+``, ``v2/r/req/j/+``) subscribes to server-side
  RPC: requests go out on ``<family prefix>{id}`` as ``{"method","params"}`` (no ``id`` in the body). A
  QoS 1 request is delivered when the device PUBACKs it; QoS 0 when written.
- SUBSCRIBE ``v1/devices/me/attributes`` (or ``v2/a``, ``v2/a/j``) subscribes to shared-attribute updates,
  pushed flat with ``"deleted"``; no snapshot on subscribe, as in ThingsBoard.
- The topic family is the one the device subscribed with last; UNSUBSCRIBE of the last filter of a feature
  ends that subscription. Downlink QoS follows the granted QoS (``Session.publish``).
- The connection itself is the device's connect / disconnect; every read from it is activity.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.sessions import Delivery, Feature, RpcCall
from tb_gateway.mqtt.session import PubAckReceived, Subscribed, Unsubscribed
from tb_gateway.records import DeviceIdentity, Transport

if TYPE_CHECKING:
    from tb_gateway.mqtt.server import MqttConnection

CLOSE_CODES = {"taken_over": 0x8E}  # close reason -> MQTT 5 DISCONNECT code (session taken over)

# subscribe filter -> (feature, topic the downlink goes to; for RPC the prefix before the id)
FILTERS: dict[str, tuple[Feature, str]] = {
    "v1/devices/me/rpc/request/+": (Feature.RPC, "v1/devices/me/rpc/request/"),
    "v2/r/req/+": (Feature.RPC, "v2/r/req/"),
    "v2/r/req/j/+": (Feature.RPC, "v2/r/req/j/"),
    "v1/devices/me/attributes": (Feature.ATTRIBUTES, "v1/devices/me/attributes"),
    "v2/a": (Feature.ATTRIBUTES, "v2/a"),
    "v2/a/j": (Feature.ATTRIBUTES, "v2/a/j"),
}


class MqttDownlink:
    transport = Transport.MQTT
    connection = True

    def __init__(self, connection: MqttConnection, device: DeviceIdentity, hub: Downlink) -> None:
        self.device = device
        self._connection = connection
        self._hub = hub
        # every read is activity: the hub's method bound here, so a read costs one Python frame, not two
        self.activity: Callable[[int], None] = partial(hub.activity, device, Transport.MQTT)
        self._topics: dict[Feature, str] = {}  # feature -> topic family in use
        self._filters: dict[Feature, set[str]] = {Feature.RPC: set(), Feature.ATTRIBUTES: set()}
        self._unacknowledged: dict[int, int] = {}  # packet id -> RPC id
        self._events: dict[type, Callable[[Any], None]] = {
            Subscribed: self._subscribed,
            Unsubscribed: self._unsubscribed,
            PubAckReceived: self._acknowledged,
        }

    # --- DownlinkSession ---

    def push_rpc(self, call: RpcCall) -> Delivery:
        prefix = self._topics.get(Feature.RPC)
        if prefix is None:
            return Delivery.REFUSED
        body = orjson.dumps({"method": call.method, "params": call.params})
        packet_id = self._connection.send_downlink(f"{prefix}{call.id}", body)
        if packet_id is None:
            return Delivery.REFUSED  # closed, or larger than the client takes
        if packet_id == 0:
            return Delivery.DELIVERED  # QoS 0
        self._unacknowledged[packet_id] = call.id
        return Delivery.SENT

    def push_attributes(self, update: dict[str, Any]) -> None:
        topic = self._topics.get(Feature.ATTRIBUTES)
        if topic is not None:
            self._connection.send_downlink(topic, orjson.dumps(update))

    def close(self, reason: str) -> None:
        """DISCONNECT 0x8E when the device connected to another instance (docs/scale-out.md), else 0x98."""
        self._connection.shut(CLOSE_CODES.get(reason, 0x98), reason)  # default: administrative action

    # --- the connection's life ---

    def ended(self) -> None:
        """The connection is gone; what it was sent unacknowledged waits for the device's next session."""
        self._hub.detach(self)

    # --- session events ---

    def event(self, event: Any) -> None:
        handle = self._events.get(type(event))
        if handle is not None:
            handle(event)

    def _subscribed(self, event: Subscribed) -> None:
        for topic_filter, _qos in event.granted:
            entry = FILTERS.get(topic_filter)
            if entry is None:
                continue
            feature, topic = entry
            self._filters[feature].add(topic_filter)
            self._topics[feature] = topic
            self._hub.subscribe(self, feature)  # RPC: what waits for the device goes out now

    def _unsubscribed(self, event: Unsubscribed) -> None:
        for topic_filter in event.topic_filters:
            entry = FILTERS.get(topic_filter)
            if entry is None:
                continue
            feature = entry[0]
            remaining = self._filters[feature]
            remaining.discard(topic_filter)
            if remaining:
                self._topics[feature] = FILTERS[next(iter(remaining))][1]
            else:
                self._topics.pop(feature, None)
                self._hub.unsubscribe(self, feature)

    def _acknowledged(self, event: PubAckReceived) -> None:
        rpc_id = self._unacknowledged.pop(event.packet_id, None)
        if rpc_id is not None and event.reason_code < 0x80:
            self._hub.rpc_delivered(self.device.id, rpc_id)
