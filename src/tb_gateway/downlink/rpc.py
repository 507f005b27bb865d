"""Server-side RPC lifecycle, sans-IO: time is a parameter (epoch milliseconds), outcomes are return values.

A request gets the next per-device int id (spec §1.8) and waits until a session subscribed to RPC takes
it; it stays pending until its expiry, so a device that connects (or polls, or observes) later still gets
it. Every request ends with exactly one final outcome and the backend hears of every step::

    submitted --offered--> sent --device ack--> delivered --reply--> replied          (two-way)
        |                   |  \\                   |                                   (one-way ends at delivered)
        |                   |   session closed -> back to waiting
        +-- expiry: expired +-- expiry: timeout ---+-- expiry: timeout
    over the per-device limit, or an expiry already past: rejected

``delivered`` is reported once, then ``replied`` or ``timeout`` for two-way requests. ``cancelled`` ends
what is still pending when the gateway shuts down (pending RPCs live in memory).
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from typing import Any

from tb_gateway.downlink.sessions import Delivery, DownlinkSession, Feature, RpcCall, SessionRegistry
from tb_gateway.records import Transport

MAX_ID = 2**31 - 1  # ThingsBoard's request id is an int32


class RpcStatus(enum.StrEnum):
    DELIVERED = "delivered"
    REPLIED = "replied"
    EXPIRED = "expired"  # never reached the device before its expiry
    TIMEOUT = "timeout"  # reached (or was written to) the device, no acknowledgement or reply before expiry
    REJECTED = "rejected"  # refused at submission
    CANCELLED = "cancelled"  # the gateway shut down first

    @property
    def final(self) -> bool:
        return self is not RpcStatus.DELIVERED


@dataclass(frozen=True, slots=True)
class RpcRequest:
    device_id: str
    id: int
    method: str
    params: Any
    oneway: bool
    expires_at: int  # epoch ms
    request_id: str | None = None  # the backend's own correlation id, echoed in every outcome

    @property
    def call(self) -> RpcCall:
        return RpcCall(self.id, self.method, self.params)


@dataclass(frozen=True, slots=True)
class RpcOutcome:
    """One step of a request's life, reported to the backend (and to a waiting CLI)."""

    request: RpcRequest
    status: RpcStatus
    at: int
    response: Any = None
    transport: Transport = Transport.GATEWAY  # the transport that carried it, if any

    @property
    def final(self) -> bool:
        return self.status.final or self.request.oneway

    def values(self) -> dict[str, Any]:
        """The record's ``values`` (docs/kafka-records.md, "RPC response")."""
        r = self.request
        return {
            "id": r.id,
            "requestId": r.request_id,
            "method": r.method,
            "oneway": r.oneway,
            "status": self.status.value,
            "response": self.response,
        }


class _State(enum.Enum):
    WAITING = 0
    SENT = 1
    DELIVERED = 2


@dataclass(slots=True)
class _Pending:
    request: RpcRequest
    state: _State = _State.WAITING
    session: DownlinkSession | None = None
    transport: Transport = Transport.GATEWAY


@dataclass(slots=True)
class _Device:
    next_id: int = 1
    pending: dict[int, _Pending] = field(default_factory=dict)


class RpcManager:
    def __init__(self, sessions: SessionRegistry, *, max_pending_per_device: int = 100) -> None:
        self._sessions = sessions
        self._max_pending = max_pending_per_device
        self._devices: dict[str, _Device] = {}
        self._expiries: list[tuple[int, str, int]] = []  # (expires_at, device_id, id); stale entries skipped
        self.pending = 0

    # --- from the backend ---

    def submit(
        self,
        device_id: str,
        method: str,
        params: Any,
        *,
        oneway: bool,
        expires_at: int,
        now: int,
        request_id: str | None = None,
    ) -> tuple[RpcRequest, list[RpcOutcome]]:
        device = self._devices.setdefault(device_id, _Device())
        request = RpcRequest(device_id, device.next_id, method, params, oneway, expires_at, request_id)
        device.next_id = device.next_id % MAX_ID + 1
        if len(device.pending) >= self._max_pending or expires_at <= now:
            return request, [RpcOutcome(request, RpcStatus.REJECTED, now)]
        pending = _Pending(request)
        device.pending[request.id] = pending
        self.pending += 1
        heapq.heappush(self._expiries, (expires_at, device_id, request.id))
        return request, self._offer(pending, now)

    # --- from the transports ---

    def subscribed(self, device_id: str, now: int) -> list[RpcOutcome]:
        """A session of the device subscribed to RPC: offer it everything still waiting, oldest first."""
        device = self._devices.get(device_id)
        if device is None:
            return []
        outcomes: list[RpcOutcome] = []
        for pending in list(device.pending.values()):
            if pending.state is _State.WAITING:
                outcomes += self._offer(pending, now)
        return outcomes

    def delivered(self, device_id: str, rpc_id: int, now: int) -> list[RpcOutcome]:
        """The device acknowledged the request (MQTT PUBACK, CoAP ACK of the notification)."""
        pending = self._find(device_id, rpc_id)
        if pending is None or pending.state is not _State.SENT:
            return []
        return self._mark_delivered(pending, now)

    def replied(self, device_id: str, rpc_id: int, response: Any, now: int) -> list[RpcOutcome] | None:
        """The device's reply; ``None`` when no two-way request with that id is pending (late, or unknown)."""
        pending = self._find(device_id, rpc_id)
        if pending is None or pending.request.oneway:
            return None
        # a reply proves delivery, even if the acknowledgement was lost with a closed session
        outcomes = self._mark_delivered(pending, now) if pending.state is not _State.DELIVERED else []
        self._finish(pending)
        outcomes.append(RpcOutcome(pending.request, RpcStatus.REPLIED, now, response, pending.transport))
        return outcomes

    def session_closed(self, session: DownlinkSession, now: int) -> list[RpcOutcome]:
        """Requests written to a session that closed unacknowledged wait again, for the next session."""
        device = self._devices.get(session.device.id)
        if device is None:
            return []
        outcomes: list[RpcOutcome] = []
        for pending in list(device.pending.values()):
            if pending.state is _State.SENT and pending.session is session:
                pending.state, pending.session = _State.WAITING, None
                outcomes += self._offer(pending, now)
        return outcomes

    # --- to another process (downlink/router.py) ---

    def take_waiting(self, device_id: str) -> list[RpcRequest]:
        """Remove and return the device's requests no session holds (never sent, or given back by a closed
        session): they move to the process that holds the device, which reports their outcomes from then on.
        Nothing is reported here: none of them had an outcome yet."""
        device = self._devices.get(device_id)
        if device is None:
            return []
        taken = [p.request for p in device.pending.values() if p.state is _State.WAITING]
        for request in taken:
            del device.pending[request.id]
        self.pending -= len(taken)
        return taken

    def forget(self, device_id: str) -> bool:
        """Drop what is kept for a device with nothing pending (its next request is id 1 again); False when
        something is pending: then nothing is dropped. The hub calls it once a device's last request ended
        (no request of it can be replied to any more, so no id can be answered twice), so a device is kept
        only while it has requests pending. Heap entries of its ended requests stay until their expiry and
        are skipped (``_expiring``)."""
        device = self._devices.get(device_id)
        if device is not None and device.pending:
            return False
        self._devices.pop(device_id, None)
        return True

    def waiting_devices(self) -> list[str]:
        """Devices with requests that no session holds."""
        return [
            device_id
            for device_id, device in self._devices.items()
            if any(p.state is _State.WAITING for p in device.pending.values())
        ]

    def waiting_until(self, device_id: str) -> int | None:
        """The latest expiry of the device's waiting requests."""
        device = self._devices.get(device_id)
        if device is None:
            return None
        return max((p.request.expires_at for p in device.pending.values() if p.state is _State.WAITING), default=None)

    # --- time ---

    def next_deadline(self) -> int | None:
        while self._expiries:
            expires_at, device_id, rpc_id = self._expiries[0]
            if self._expiring(expires_at, device_id, rpc_id) is not None:
                return expires_at
            heapq.heappop(self._expiries)
        return None

    def expire(self, now: int) -> list[RpcOutcome]:
        outcomes: list[RpcOutcome] = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, device_id, rpc_id = heapq.heappop(self._expiries)
            pending = self._expiring(expires_at, device_id, rpc_id)
            if pending is None:
                continue
            self._finish(pending)
            status = RpcStatus.EXPIRED if pending.state is _State.WAITING else RpcStatus.TIMEOUT
            outcomes.append(RpcOutcome(pending.request, status, now, None, pending.transport))
        return outcomes

    def cancel_all(self, now: int) -> list[RpcOutcome]:
        outcomes = [
            RpcOutcome(p.request, RpcStatus.CANCELLED, now, None, p.transport)
            for device in self._devices.values()
            for p in device.pending.values()
        ]
        for device in self._devices.values():
            device.pending.clear()
        self._expiries.clear()
        self.pending = 0
        return outcomes

    # --- inside ---

    def _find(self, device_id: str, rpc_id: int) -> _Pending | None:
        device = self._devices.get(device_id)
        return device.pending.get(rpc_id) if device is not None else None

    def _expiring(self, expires_at: int, device_id: str, rpc_id: int) -> _Pending | None:
        """The request a heap entry stands for; ``None`` for a stale entry: its request ended, or the device
        was forgotten and its ids restarted, so the same id now names a later request with its own entry."""
        pending = self._find(device_id, rpc_id)
        return pending if pending is not None and pending.request.expires_at == expires_at else None

    def _offer(self, pending: _Pending, now: int) -> list[RpcOutcome]:
        call = pending.request.call
        for session in self._sessions.subscribers(pending.request.device_id, Feature.RPC):
            answer = session.push_rpc(call)
            if answer is Delivery.REFUSED:
                continue
            pending.transport = session.transport
            if answer is Delivery.SENT:
                pending.state, pending.session = _State.SENT, session
                return []
            return self._mark_delivered(pending, now)
        return []

    def _mark_delivered(self, pending: _Pending, now: int) -> list[RpcOutcome]:
        pending.state, pending.session = _State.DELIVERED, None
        if pending.request.oneway:
            self._finish(pending)
        return [RpcOutcome(pending.request, RpcStatus.DELIVERED, now, None, pending.transport)]

    def _finish(self, pending: _Pending) -> None:
        device = self._devices[pending.request.device_id]
        if device.pending.pop(pending.request.id, None) is not None:
            self.pending -= 1
