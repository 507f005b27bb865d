"""Online / offline tracking, sans-IO: time is a parameter (epoch ms), state events are return values.

ThingsBoard's names (spec §6.3): ``active``, ``lastConnectTime``, ``lastDisconnectTime``,
``lastActivityTime``. The rules (docs/downlink.md, "Device state"):

- *connect*: a device's first connection opens (MQTT). It is active while any connection is open and sends
  within the inactivity window (PINGREQ counts).
- *disconnect*: its last connection closes; it is inactive at once — the gateway knows it is gone, so no
  one has to wait ``DEVICE_INACTIVITY_TIMEOUT_SECONDS`` to learn it.
- *activity*: an inactive device sends something (an HTTP or CoAP request, an MQTT packet after a silence):
  active again. Only this transition is reported, not every message.
- *inactivity*: nothing received for the timeout: inactive. An open CoAP observation or HTTP long poll is
  not activity: only requests are.

Every event carries all four values, so each record is the device's whole state.

Memory is bounded: beyond ``max_devices`` tracked devices, the ones that have been inactive and disconnected
longest are forgotten (their last state is already in a record). A forgotten device that comes back starts
afresh: its next event has no earlier connect or disconnect time. Active or connected devices are never
forgotten, since their inactivity or disconnect is still to be reported.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Any

from tb_gateway.records import DeviceIdentity, Transport


class StateEvent(enum.StrEnum):
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    ACTIVITY = "activity"
    INACTIVITY = "inactivity"


@dataclass(frozen=True, slots=True)
class StateChanged:
    device: DeviceIdentity
    event: StateEvent
    at: int
    transport: Transport
    active: bool
    last_connect: int | None
    last_disconnect: int | None
    last_activity: int | None

    def values(self) -> dict[str, Any]:
        """The record's ``values`` (docs/kafka-records.md, "Device state")."""
        return {
            "event": self.event.value,
            "active": self.active,
            "lastConnectTime": self.last_connect,
            "lastDisconnectTime": self.last_disconnect,
            "lastActivityTime": self.last_activity,
        }


class DeviceState:
    __slots__ = (
        "active",
        "check_at",
        "connections",
        "identity",
        "last_activity",
        "last_connect",
        "last_disconnect",
        "transport",
    )

    def __init__(self, identity: DeviceIdentity, transport: Transport) -> None:
        self.identity = identity
        self.transport = transport
        self.connections = 0
        self.active = False
        self.last_connect: int | None = None
        self.last_disconnect: int | None = None
        self.last_activity: int | None = None
        self.check_at = 0  # the one inactivity check scheduled for it; older heap entries are stale


NOTHING: tuple[StateChanged, ...] = ()


class DeviceStateTracker:
    def __init__(self, inactivity_timeout_ms: int, max_devices: int = 1_000_000) -> None:
        self._timeout = inactivity_timeout_ms
        self._max_devices = max_devices
        self.devices: dict[str, DeviceState] = {}  # public for the hub's hot path: active -> set last_activity
        self._checks: list[tuple[int, str]] = []  # (when to look again, device id), one per active device
        # inactive and disconnected devices, the one in that state longest first: who is forgotten first
        self._dormant: dict[str, None] = {}
        self.forgotten: list[str] = []  # ids forgotten since the owner last took them (take_forgotten)
        self.active = 0

    def connected(self, device: DeviceIdentity, transport: Transport, now: int) -> tuple[StateChanged, ...]:
        state = self._state(device, transport)
        state.transport = transport
        state.connections += 1
        state.last_activity = now
        if state.connections > 1:
            return NOTHING
        state.last_connect = now
        self._activate(state, now)
        return (self._event(state, StateEvent.CONNECT, now),)

    def disconnected(self, device: DeviceIdentity, transport: Transport, now: int) -> tuple[StateChanged, ...]:
        state = self.devices.get(device.id)
        if state is None or state.connections == 0:
            return NOTHING
        state.connections -= 1
        if state.connections:
            return NOTHING
        state.transport = transport
        state.last_disconnect = now
        if state.active:
            state.active = False
            self.active -= 1
        self._dormant.pop(device.id, None)  # to the end: dormant since now
        self._dormant[device.id] = None
        return (self._event(state, StateEvent.DISCONNECT, now),)

    def activity(self, device: DeviceIdentity, transport: Transport, now: int) -> tuple[StateChanged, ...]:
        """Called for every message a device sends: cheap when nothing changes."""
        state = self.devices.get(device.id)
        if state is not None and state.active:
            state.last_activity = now
            return NOTHING
        state = self._state(device, transport)
        state.transport = transport
        state.last_activity = now
        self._activate(state, now)
        return (self._event(state, StateEvent.ACTIVITY, now),)

    def next_deadline(self) -> int | None:
        """When ``expire`` may have something to do (a check can find the device active and re-arm)."""
        while self._checks:
            check_at, device_id = self._checks[0]
            state = self.devices.get(device_id)
            if state is not None and state.active and state.check_at == check_at:
                return check_at
            heapq.heappop(self._checks)
        return None

    def expire(self, now: int) -> list[StateChanged]:
        events = []
        while self._checks and self._checks[0][0] <= now:
            check_at, device_id = heapq.heappop(self._checks)
            state = self.devices.get(device_id)
            if state is None or not state.active or state.check_at != check_at:
                continue
            due = (state.last_activity or 0) + self._timeout
            if due > now:  # it sent something since: look again then
                self._schedule(state, due)
                continue
            state.active = False
            self.active -= 1
            if not state.connections:
                self._dormant[device_id] = None
            events.append(self._event(state, StateEvent.INACTIVITY, now))
        return events

    def take_forgotten(self) -> list[str]:
        """The ids of the devices forgotten since the last call (the hub drops what it kept for them)."""
        forgotten, self.forgotten = self.forgotten, []
        return forgotten

    def state(self, device_id: str) -> dict[str, Any] | None:
        state = self.devices.get(device_id)
        if state is None:
            return None
        values = self._event(state, StateEvent.ACTIVITY, 0).values()
        del values["event"]
        return values

    def _state(self, device: DeviceIdentity, transport: Transport) -> DeviceState:
        state = self.devices.get(device.id)
        if state is None:
            if len(self.devices) >= self._max_devices:
                self._forget_dormant()
            state = self.devices[device.id] = DeviceState(device, transport)
        return state

    def _forget_dormant(self) -> None:
        """Make room for one more device, if a dormant one can go (active ones never do)."""
        dormant = self._dormant
        while dormant and len(self.devices) >= self._max_devices:
            device_id = next(iter(dormant))
            del dormant[device_id]
            del self.devices[device_id]
            self.forgotten.append(device_id)

    def _activate(self, state: DeviceState, now: int) -> None:
        if not state.active:
            state.active = True
            self.active += 1
            self._dormant.pop(state.identity.id, None)
            self._schedule(state, now + self._timeout)

    def _schedule(self, state: DeviceState, at: int) -> None:
        state.check_at = at
        heapq.heappush(self._checks, (at, state.identity.id))

    def _event(self, state: DeviceState, event: StateEvent, now: int) -> StateChanged:
        return StateChanged(
            state.identity,
            event,
            now,
            state.transport,
            state.active,
            state.last_connect,
            state.last_disconnect,
            state.last_activity,
        )
