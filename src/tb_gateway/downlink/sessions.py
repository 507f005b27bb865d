"""Which live sessions hold a device, and what each of them asked to receive.

A *downlink session* is anything that can carry a message down to a device: an MQTT connection, a CoAP
observation, an HTTP long poll. Each transport's session implements the small ``DownlinkSession``
protocol; the rest of the downlink package only talks to that protocol, so it never branches on the
transport, and a cross-process router (docs/downlink.md) plugs in above this module without any transport
change.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from tb_gateway.records import DeviceIdentity, Transport


class Feature(enum.StrEnum):
    """What a session subscribed to (MQTT SUBSCRIBE, CoAP Observe, HTTP long poll)."""

    RPC = "rpc"  # server-side RPC requests
    ATTRIBUTES = "attributes"  # shared-attribute updates


class Delivery(enum.Enum):
    """A session's answer to ``push_rpc``."""

    SENT = "sent"  # written; the session calls ``Downlink.rpc_delivered`` when the device acknowledges it
    DELIVERED = "delivered"  # written and nothing more will confirm it (MQTT QoS 0, an HTTP 200 response)
    REFUSED = "refused"  # cannot take it now (long poll already answered, too many unacknowledged)


@dataclass(frozen=True, slots=True)
class RpcCall:
    """A server-side RPC as a device sees it; ``id`` is the per-device int request id (spec §1.8)."""

    id: int
    method: str
    params: Any

    def body(self) -> dict[str, Any]:
        """``{"id","method","params"}``: the HTTP long-poll and CoAP body (MQTT puts the id in the topic)."""
        return {"id": self.id, "method": self.method, "params": self.params}


class DownlinkSession(Protocol):
    """What a transport's session offers the downlink.

    ``connection`` is true when the session's open and close are the device's connect and disconnect (an
    MQTT connection), false for a CoAP observation or an HTTP long poll: those come and go with requests,
    and only the requests themselves count as activity.
    """

    device: DeviceIdentity
    transport: Transport
    connection: bool

    def push_rpc(self, call: RpcCall) -> Delivery:
        """Write a server-side RPC request to the device (never blocks)."""
        ...

    def push_attributes(self, update: dict[str, Any]) -> None:
        """Write a shared-attribute update ``{"k": v, ..., "deleted": [..]}`` to the device."""
        ...

    def close(self, reason: str) -> None:
        """Close the session (device removed, taken over, shutdown); the transport then calls ``detach``."""
        ...


class SessionRegistry:
    """device id -> its live sessions, each with the features it subscribed to (insertion-ordered)."""

    def __init__(self) -> None:
        self._devices: dict[str, dict[DownlinkSession, set[Feature]]] = {}
        self._subscriptions: dict[Feature, int] = dict.fromkeys(Feature, 0)

    def attach(self, session: DownlinkSession) -> None:
        self._devices.setdefault(session.device.id, {}).setdefault(session, set())

    def detach(self, session: DownlinkSession) -> bool:
        """Forget a session; returns whether it was known."""
        sessions = self._devices.get(session.device.id)
        if sessions is None or session not in sessions:
            return False
        for feature in sessions.pop(session):
            self._subscriptions[feature] -= 1
        if not sessions:
            del self._devices[session.device.id]
        return True

    def subscribe(self, session: DownlinkSession, feature: Feature) -> bool:
        """Returns whether this is a new subscription (attaching the session if needed)."""
        features = self._devices.setdefault(session.device.id, {}).setdefault(session, set())
        if feature in features:
            return False
        features.add(feature)
        self._subscriptions[feature] += 1
        return True

    def unsubscribe(self, session: DownlinkSession, feature: Feature) -> None:
        features = self._devices.get(session.device.id, {}).get(session)
        if features is not None and feature in features:
            features.discard(feature)
            self._subscriptions[feature] -= 1

    def subscribers(self, device_id: str, feature: Feature) -> list[DownlinkSession]:
        """The device's sessions subscribed to ``feature``, oldest first."""
        sessions = self._devices.get(device_id)
        if not sessions:
            return []
        return [session for session, features in sessions.items() if feature in features]

    def sessions(self, device_id: str) -> list[DownlinkSession]:
        return list(self._devices.get(device_id, ()))

    def holds(self, device_id: str) -> bool:
        return device_id in self._devices

    def __iter__(self) -> Iterator[DownlinkSession]:
        for sessions in list(self._devices.values()):
            yield from list(sessions)

    def subscriptions(self, feature: Feature) -> int:
        return self._subscriptions[feature]

    @property
    def devices(self) -> int:
        return len(self._devices)
