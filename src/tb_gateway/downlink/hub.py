"""The downlink's one object: the asyncio adapter around the sans-IO cores of this package.

Transports call the *transport side* (attach / subscribe / detach a ``DownlinkSession``, report activity,
acknowledgements, RPC replies and client-side RPC requests); sources (the Kafka consumer, the admin API)
call the *backend side* (send an RPC, change shared attributes, answer a client-side RPC). Neither side
knows the other: a cross-process router (docs/downlink.md, "More than one process") wraps the backend
side and leaves the transport side as it is.

Outcomes, client-side RPC requests and device state changes become records (``rpc_response``,
``rpc_request``, ``device_state``) submitted to the pipeline like any device message, so they reach the
RPC-response / RPC-request / device-event topics or the embedded store. The clock is injected; ``run`` only
sleeps until the earliest deadline of the cores and calls ``tick``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from tb_gateway.attributes import AttributeStore
from tb_gateway.clock import now_ms
from tb_gateway.config import Settings
from tb_gateway.downlink.client_rpc import TIMEOUT_REPLY, ClientRpcTable
from tb_gateway.downlink.device_state import DeviceStateTracker, StateChanged
from tb_gateway.downlink.rpc import RpcManager, RpcOutcome, RpcRequest, RpcStatus
from tb_gateway.downlink.sessions import DownlinkSession, Feature, SessionRegistry
from tb_gateway.downlink.shared_attributes import SharedAttributes, SharedChange
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

log = logging.getLogger(__name__)

SESSION_LIMITS = "getSessionLimits"  # answered locally, never forwarded (spec §1.9)

Submit = Callable[[Sequence[Record]], "Outcome | asyncio.Future[Outcome]"]


class DownlinkSource(Protocol):
    """Where backend requests come from (the Kafka consumer); ``run`` until ``close``."""

    name: str

    async def run(self) -> None: ...

    def close(self) -> None: ...


class Downlink:
    def __init__(
        self,
        store: AttributeStore,
        metrics: Metrics,
        *,
        submit: Submit | None,
        session_limits: Callable[[], dict[str, Any]],
        instance: str,
        rpc_default_timeout_ms: int = 10_000,
        rpc_max_timeout_ms: int = 86_400_000,
        rpc_max_pending_per_device: int = 100,
        client_rpc_timeout_ms: int = 60_000,
        client_rpc_max_pending: int = 10_000,
        inactivity_timeout_ms: int = 600_000,
        max_tracked_devices: int = 1_000_000,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.sessions = SessionRegistry()
        self.instance = instance  # this process's id: client-RPC ids start with it, the router names it so
        self.connect_listeners: list[Callable[[DeviceIdentity], object]] = []  # e.g. Redis session take-over
        # the cross-process router (downlink/router.py): the device's first session here / its last one gone,
        # and a server-side RPC queued for a device that no session here holds
        self.hold_listeners: list[Callable[[DeviceIdentity, bool], object]] = []
        self.unheld_rpc_listeners: list[Callable[[str], object]] = []
        self.rpc = RpcManager(self.sessions, max_pending_per_device=rpc_max_pending_per_device)
        self.client_rpc_table = ClientRpcTable(
            instance, timeout_ms=client_rpc_timeout_ms, max_pending=client_rpc_max_pending
        )
        self.shared = SharedAttributes(store, self.sessions)
        self.state = DeviceStateTracker(inactivity_timeout_ms, max_tracked_devices)
        self._states = self.state.devices  # read on every device message (``activity``)
        self._metrics = metrics
        self._submit = submit
        self._session_limits = session_limits
        self._rpc_default_ms = rpc_default_timeout_ms
        self._rpc_max_ms = rpc_max_timeout_ms
        self._clock_ms = clock_ms
        self._rpc_waiters: dict[tuple[str, int], asyncio.Future[RpcOutcome]] = {}
        self._client_waiters: dict[str, asyncio.Future[Any]] = {}
        self._identities: dict[str, DeviceIdentity] = {}  # for RPC records and hand-overs (``_release``)
        self._idle: set[str] = set()  # devices whose last RPC ended or last session went: ``_release`` soon
        self._wake = asyncio.Event()
        self._closed = False
        self._rpc_status = {s: metrics.rpc_outcomes.labels(status=s.value) for s in RpcStatus}
        metrics.rpc_pending.set_function(lambda: self.rpc.pending)
        metrics.devices_active.set_function(lambda: self.state.active)
        for feature in Feature:
            metrics.downlink_subscriptions.labels(feature=feature.value).set_function(
                lambda f=feature: self.sessions.subscriptions(f)  # type: ignore[misc]
            )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: AttributeStore,
        metrics: Metrics,
        submit: Submit | None,
        session_limits: Callable[[], dict[str, Any]],
    ) -> Downlink:
        return cls(
            store,
            metrics,
            submit=submit,
            session_limits=session_limits,
            instance=secrets.token_hex(6),  # client-RPC ids stay unique across restarts and processes
            rpc_default_timeout_ms=round(settings.rpc_default_timeout_seconds * 1000),
            rpc_max_timeout_ms=round(settings.rpc_max_timeout_seconds * 1000),
            rpc_max_pending_per_device=settings.rpc_max_pending_per_device,
            client_rpc_timeout_ms=round(settings.client_side_rpc_timeout_seconds * 1000),
            client_rpc_max_pending=settings.client_side_rpc_max_pending,
            inactivity_timeout_ms=round(settings.device_inactivity_timeout_seconds * 1000),
            max_tracked_devices=settings.device_state_max_devices,
        )

    # ------------------------------------------------------------------ transport side

    def attach(self, session: DownlinkSession) -> None:
        """A session is live (MQTT: after CONNACK). A connection's attach is the device's connect."""
        first = not self.sessions.holds(session.device.id)
        self.sessions.attach(session)
        if first:
            for hold in self.hold_listeners:
                hold(session.device, True)
        self._identities[session.device.id] = session.device
        if session.connection:
            self._state(self.state.connected(session.device, session.transport, self._clock_ms()))
            if self.state.forgotten:
                self._forget(self.state.take_forgotten())
            for listener in self.connect_listeners:
                listener(session.device)

    def detach(self, session: DownlinkSession) -> None:
        """The session closed. What it had been sent unacknowledged waits for the device's next session."""
        if not self.sessions.detach(session):
            return
        now = self._clock_ms()
        self._report(self.rpc.session_closed(session, now))
        if session.connection:
            self._state(self.state.disconnected(session.device, session.transport, now))
        if not self.sessions.holds(session.device.id):
            for hold in self.hold_listeners:
                hold(session.device, False)
            self._release_later(session.device.id)

    def subscribe(self, session: DownlinkSession, feature: Feature) -> None:
        """The session wants ``feature``; subscribing to RPC delivers what is pending."""
        self._identities[session.device.id] = session.device
        if self.sessions.subscribe(session, feature) and feature is Feature.RPC:
            self._report(self.rpc.subscribed(session.device.id, self._clock_ms()))

    def unsubscribe(self, session: DownlinkSession, feature: Feature) -> None:
        self.sessions.unsubscribe(session, feature)

    def ready(self, session: DownlinkSession) -> None:
        """A session that refused an RPC for want of room has room again (a CoAP notification window freed):
        offer what still waits for the device, as a new subscription would."""
        if session in self.sessions.subscribers(session.device.id, Feature.RPC):
            self._report(self.rpc.subscribed(session.device.id, self._clock_ms()))

    def activity(self, device: DeviceIdentity, transport: Transport, now_ms: int | None = None) -> None:
        """Every message a device sends (and MQTT PINGREQ); cheap unless the device was inactive."""
        now = self._clock_ms() if now_ms is None else now_ms
        known = self._states.get(device.id)
        if known is not None and known.active:  # the hot path: one lookup
            known.last_activity = now
            return
        events = self.state.activity(device, transport, now)
        if events:
            self._identities[device.id] = device
            self._state(events)
            if self.state.forgotten:
                self._forget(self.state.take_forgotten())

    def rpc_delivered(self, device_id: str, rpc_id: int) -> None:
        """The device acknowledged an RPC request that ``push_rpc`` answered ``SENT``."""
        self._report(self.rpc.delivered(device_id, rpc_id, self._clock_ms()))

    def rpc_replied(self, device_id: str, rpc_id: int, payload: bytes) -> bool:
        """The device's reply to RPC ``rpc_id``; false when none is pending (late, unknown, one-way)."""
        outcomes = self.rpc.replied(device_id, rpc_id, _reply_value(payload), self._clock_ms())
        if outcomes is None:
            self._metrics.rpc_outcomes.labels(status="unmatched_reply").inc()
            return False
        self._report(outcomes)
        return True

    def client_rpc(self, device: DeviceIdentity, transport: Transport, method: str, params: Any) -> asyncio.Future[Any]:
        """A device's RPC to the backend; the future resolves with the reply (or ``{"error": ...}``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_result({"error": "gateway shutting down"})
            return future
        if method == SESSION_LIMITS:
            self._metrics.client_rpc.labels(result="local").inc()
            future.set_result(self._session_limits())
            return future
        now = self._clock_ms()
        request = self.client_rpc_table.open(device.id, method, params, now)
        if request is None or self._submit is None:
            self._metrics.client_rpc.labels(result="refused").inc()
            future.set_result({"error": "too many pending requests" if request is None else "no backend"})
            return future
        self._client_waiters[request.id] = future
        record = Record(device, RecordKind.RPC_REQUEST, now, request.values(), transport, now)
        admitted = self._submit([record])
        if isinstance(admitted, Outcome):
            self._client_refused(request.id, admitted)
        else:
            admitted.add_done_callback(lambda done: self._client_refused(request.id, _result(done)))
        future.add_done_callback(lambda done: self._client_done(request.id, done))
        self._wake.set()
        return future

    def shared_snapshot(self, device_id: str) -> dict[str, Any]:
        return self.shared.snapshot(device_id)

    # ------------------------------------------------------------------ backend side

    def send_rpc(
        self,
        device_id: str,
        method: str,
        params: Any,
        *,
        oneway: bool = False,
        timeout_ms: int | None = None,
        expires_at: int | None = None,
        request_id: str | None = None,
        device: DeviceIdentity | None = None,
    ) -> tuple[RpcRequest, asyncio.Future[RpcOutcome]]:
        """Queue a server-side RPC; the future resolves with its final outcome."""
        if device is not None:
            self._identities.setdefault(device_id, device)
        now = self._clock_ms()
        latest = now + self._rpc_max_ms
        if expires_at is None:
            expires_at = now + (self._rpc_default_ms if timeout_ms is None else timeout_ms)
        expires_at = min(expires_at, latest)
        future: asyncio.Future[RpcOutcome] = asyncio.get_running_loop().create_future()
        request, outcomes = self.rpc.submit(
            device_id, method, params, oneway=oneway, expires_at=expires_at, now=now, request_id=request_id
        )
        if self._closed:  # nothing would ever expire it
            outcomes = [*outcomes, *self.rpc.cancel_all(now)]
        self._rpc_waiters[(device_id, request.id)] = future
        self._report(outcomes)
        self._wake.set()
        if not future.done() and not self.sessions.holds(device_id):
            for unheld in self.unheld_rpc_listeners:
                unheld(device_id)
        return request, future

    def hand_off(self, device_id: str) -> list[tuple[RpcRequest, asyncio.Future[RpcOutcome] | None]]:
        """The device is held by another process: take out its waiting requests (and their waiters) for the
        router to send there. Nothing while a session here holds the device: it is delivered here."""
        if self._closed or self.sessions.holds(device_id):
            return []
        taken = self.rpc.take_waiting(device_id)
        return [(request, self._rpc_waiters.pop((device_id, request.id), None)) for request in taken]

    def identity(self, device_id: str) -> DeviceIdentity:
        return self._identity(device_id)

    def change_shared(self, device_id: str, change: SharedChange) -> dict[str, Any] | None:
        message, pushed = self.shared.apply(device_id, change)
        if message is not None:
            self._metrics.shared_attribute_updates.inc()
            self._metrics.downlink_pushes.labels(kind="attributes").inc(pushed)
        return message

    def client_rpc_reply(self, request_id: str, response: Any, device_id: str | None = None) -> bool:
        """The backend's answer to a client-side RPC; false when nobody waits for it any more."""
        if self.client_rpc_table.reply(request_id, device_id) is None:
            return False
        future = self._client_waiters.pop(request_id, None)
        if future is None:
            return False
        self._metrics.client_rpc.labels(result="replied").inc()
        if not future.done():
            future.set_result(response)
        return True

    def owns_client_rpc(self, request_id: str) -> bool:
        return self.client_rpc_table.owns(request_id)

    def device_state(self, device_id: str) -> dict[str, Any] | None:
        return self.state.state(device_id)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> int | None:
        deadlines = [
            d
            for d in (self.rpc.next_deadline(), self.client_rpc_table.next_deadline(), self.state.next_deadline())
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def tick(self) -> None:
        now = self._clock_ms()
        self._report(self.rpc.expire(now))
        for request in self.client_rpc_table.expire(now):
            future = self._client_waiters.pop(request.id, None)
            self._metrics.client_rpc.labels(result="timeout").inc()
            if future is not None and not future.done():
                future.set_result(dict(TIMEOUT_REPLY))
        self._state(self.state.expire(now))

    async def run(self) -> None:
        """Fires the cores' deadlines until ``close``."""
        while not self._closed:
            self._wake.clear()
            deadline = self.next_deadline()
            delay = None if deadline is None else max(0.0, (deadline - self._clock_ms()) / 1000)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if not self._closed:
                self.tick()

    def close(self) -> None:
        """Shutdown, before the transports drain: pending RPCs end ``cancelled``, waiting client RPCs get an
        error, and observations and long polls end (they exist only for the downlink). Connections are left
        to their transport's drain, which answers what they sent before closing them."""
        if self._closed:
            return
        for session in list(self.sessions):
            if not session.connection:
                session.close("shutdown")
        self._report(self.rpc.cancel_all(self._clock_ms()))
        for future in self._client_waiters.values():
            if not future.done():
                future.set_result({"error": "gateway shutting down"})
        self._client_waiters.clear()
        self._closed = True
        self._wake.set()

    # ------------------------------------------------------------------ inside

    def _identity(self, device_id: str) -> DeviceIdentity:
        identity = self._identities.get(device_id)
        return identity if identity is not None else DeviceIdentity(device_id, device_id)

    def _forget(self, device_ids: list[str]) -> None:
        """The tracker forgot these dormant devices (too many tracked): drop what else is kept for them,
        unless an RPC for the device is still pending or it holds a session."""
        self._metrics.device_states_forgotten.inc(len(device_ids))
        for device_id in device_ids:
            if not self.sessions.holds(device_id) and self.rpc.forget(device_id):
                self._identities.pop(device_id, None)

    def _release_later(self, device_id: str) -> None:
        """``_release`` the device once the callbacks of what just ended have run (they may still read its
        identity, or key on its RPC id: the router's), unless something new is pending for it by then."""
        if not self._idle:
            try:
                asyncio.get_running_loop().call_soon(self._release)
            except RuntimeError:  # no loop (a sans-IO caller): nothing waits on callbacks
                self._idle.add(device_id)
                self._release()
                return
        self._idle.add(device_id)

    def _release(self) -> None:
        """Drop what is kept for devices no session holds and with no RPC pending (their next RPC is id 1
        again: nothing of theirs can be replied to any more; a held device's ids go on counting), and their
        identity unless the state tracker tracks them (``_forget`` drops it then). A device sent RPCs but
        never connected keeps nothing once they ended; a connected one, nothing once it is gone too."""
        idle, self._idle = self._idle, set()
        for device_id in idle:
            if not self.sessions.holds(device_id) and self.rpc.forget(device_id) and device_id not in self._states:
                self._identities.pop(device_id, None)

    def _report(self, outcomes: Sequence[RpcOutcome]) -> None:
        for outcome in outcomes:
            request = outcome.request
            self._rpc_status[outcome.status].inc()
            if outcome.status is RpcStatus.DELIVERED:
                self._metrics.downlink_pushes.labels(kind="rpc").inc()
            self._emit(self._identity(request.device_id), RecordKind.RPC_RESPONSE, outcome.transport, outcome.values())
            if outcome.final:
                future = self._rpc_waiters.pop((request.device_id, request.id), None)
                if future is not None and not future.done():
                    future.set_result(outcome)
                self._release_later(request.device_id)

    def _state(self, events: Sequence[StateChanged]) -> None:
        for event in events:
            self._metrics.device_state_events.labels(event=event.event.value).inc()
            self._emit(event.device, RecordKind.DEVICE_STATE, event.transport, event.values(), event.at)
        if events:
            self._wake.set()

    def _emit(
        self,
        device: DeviceIdentity,
        kind: RecordKind,
        transport: Transport,
        values: dict[str, Any],
        ts: int | None = None,
    ) -> None:
        if self._submit is None:
            return
        now = self._clock_ms()
        admitted = self._submit([Record(device, kind, now if ts is None else ts, values, transport, now)])
        if isinstance(admitted, Outcome):
            self._emitted(kind, admitted)
        else:
            admitted.add_done_callback(lambda done: self._emitted(kind, _result(done)))

    def _emitted(self, kind: RecordKind, outcome: Outcome) -> None:
        if not outcome.delivered:
            self._metrics.downlink_records_failed.labels(kind=kind.value, outcome=outcome.value).inc()
            log.warning("a %s record was not stored: %s", kind.value, outcome.value)

    def _client_done(self, request_id: str, future: asyncio.Future[Any]) -> None:
        """A waiter cancelled by its transport (the HTTP client left) withdraws its request: the backend's
        late reply is dropped (``unmatched``), and nothing times out later."""
        self._client_waiters.pop(request_id, None)
        if future.cancelled():
            self.client_rpc_table.cancel(request_id)

    def _client_refused(self, request_id: str, outcome: Outcome) -> None:
        """The request record could not be made durable: the device hears it now, not after the timeout."""
        if outcome.delivered:
            return
        self.client_rpc_table.cancel(request_id)
        future = self._client_waiters.pop(request_id, None)
        self._metrics.client_rpc.labels(result="refused").inc()
        if future is not None and not future.done():
            future.set_result({"error": outcome.value})


def _result(done: asyncio.Future[Outcome]) -> Outcome:
    return Outcome.SHUTTING_DOWN if done.cancelled() else done.result()


def _reply_value(payload: bytes) -> Any:
    """A device's reply is taken as JSON when it parses, else as text (ThingsBoard keeps it as a string)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload.decode("utf-8", "replace")
