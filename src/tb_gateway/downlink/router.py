"""Routes the downlink between processes (``WORKERS=N``, several instances): docs/downlink.md, "More than one
process".

A device's sessions live in one process (its *holder*); a server-side RPC may be read by any (the Kafka
consumer group hands each partition to one, the admin API serves whoever the CLI asked). The router moves
the request to the holder, which queues it in its own hub as if it had read it itself, so the holder gives
it its id, delivers it and reports every outcome; the process that read it reports nothing. One request
lives in exactly one hub at a time, which is what makes "one report per outcome across the cluster" hold.

* Directory (Redis): ``<prefix>holder:<device>`` = the holder's id, written when the device's first session
  attaches here, compare-and-deleted when its last one ends; ``<prefix>alive:<id>`` (a TTL key refreshed by
  a heartbeat) says the holder still runs, so a crashed process's entries are ignored.
* A request for a device held nowhere stays in the hub that read it (its expiry runs there, so ``expired``
  is reported once, there). That process adds itself to ``<prefix>waiting:<device>`` in the same
  transaction as it reads the holder; a process taking the device reads and clears that set in the same
  transaction as it writes the holder, and tells each waiting process, which then hands its requests over.
  Either transaction comes first, so one of the two sides always sees the other. A re-check every
  ``RECHECK_S`` covers messages lost while Redis was away.
* Channels: each process listens on ``<prefix>worker:<id>`` for handed-over requests, final outcomes for a
  waiting caller (``tb-gateway rpc``), "the device you wait for is here" notices and client-side RPC replies
  (whose ids start with the id of the process that waits: ``ClientRpcTable``).

Redis down: nothing is handed over (requests stay where they were read; devices held here are served as
always) and the directory is written again when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from redis.exceptions import RedisError

from tb_gateway.clock import now_ms
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.rpc import RpcOutcome, RpcRequest, RpcStatus
from tb_gateway.downlink.shared_attributes import parse_change
from tb_gateway.errors import PayloadError
from tb_gateway.records import DeviceIdentity, Transport

if TYPE_CHECKING:
    from tb_gateway.redis_cache import RedisCache

log = logging.getLogger(__name__)

ALIVE_TTL_MS = 15_000  # a process that stopped refreshing its alive key this long ago holds nothing
HEARTBEAT_S = 5.0
RECHECK_S = 2.0  # how often devices with waiting requests are looked up again
TICKET_GRACE_MS = 10_000  # a caller waiting on a request handed to a process that died gives up this late

Errors = (RedisError, OSError, TimeoutError)
Op = Callable[[], Awaitable[None]]


class Directory(Protocol):
    """Where devices are held and how processes reach each other (Redis; a fake in the unit tests)."""

    @property
    def up(self) -> bool: ...

    def failed(self, exc: BaseException) -> None: ...

    async def hold(self, device_id: str, worker: str) -> list[str]:
        """Record ``worker`` as the holder; returns (and forgets) the processes waiting for the device."""
        ...

    async def release(self, device_id: str, worker: str) -> None:
        """Forget the holder, if it is still ``worker``."""
        ...

    async def holder_or_wait(self, device_id: str, worker: str, ttl_ms: int) -> str | None:
        """The live holder, else None; either way ``worker`` is now among those waiting (for ``ttl_ms``)."""
        ...

    async def heartbeat(self, worker: str, ttl_ms: int) -> None: ...

    async def gone(self, worker: str) -> None:
        """A clean stop: ``worker`` holds nothing any more."""
        ...

    async def publish(self, worker: str, message: bytes) -> None: ...

    async def broadcast(self, message: bytes) -> None:
        """To every process (``on_shared``): a shared-attribute change made through an admin API."""
        ...


class Router:
    def __init__(
        self, hub: Downlink, directory: Directory, clock_ms: Callable[[], int], instance: str | None = None
    ) -> None:
        self.id = hub.instance
        self.instance = instance or hub.instance  # the instance (DATA_DIR) this process belongs to
        self._hub = hub
        self._dir = directory
        self._clock_ms = clock_ms
        self._ops: asyncio.Queue[Op] = asyncio.Queue()
        self._tickets: dict[int, tuple[asyncio.Future[RpcOutcome], RpcRequest]] = {}  # a waiting caller here
        self._next_ticket = 0
        self._remote: dict[tuple[str, int], tuple[str, int]] = {}  # (device, id) -> the caller's (process, ticket)
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "rpc": self._accept,
            "outcome": self._outcome,
            "attached": self._attached,
            "client_reply": self._client_reply,
        }
        self._closed = False
        hub.hold_listeners.append(self._held)
        hub.unheld_rpc_listeners.append(lambda device_id: self._queue(lambda: self._route(device_id)))

    # ------------------------------------------------------------------ from the hub, the sources, Redis

    def _held(self, device: DeviceIdentity, held: bool) -> None:
        self._queue((lambda: self._hold(device.id)) if held else (lambda: self._release(device.id)))

    def client_reply(self, request_id: str, response: Any, device_id: str | None) -> bool:
        """A client-side RPC reply for another process (its id names it); false when it cannot be sent."""
        worker = request_id.rpartition("-")[0]
        if not worker or worker == self.id or not self._dir.up:
            return False
        body = orjson.dumps({"t": "client_reply", "id": request_id, "response": response, "device": device_id})
        self._queue(lambda: self._dir.publish(worker, body))
        return True

    def share(self, device_id: str, document: Mapping[str, Any]) -> None:
        """A shared-attribute change made through this instance's admin API (which every worker of the
        instance applied already): every other instance applies it too."""
        if self._dir.up:
            body = orjson.dumps({"instance": self.instance, "device": device_id, "change": document})
            self._queue(lambda: self._dir.broadcast(body))

    def on_shared(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            if message["instance"] != self.instance:
                self._hub.change_shared(str(message["device"]), parse_change(message["change"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, PayloadError) as exc:
            log.warning("ignored a malformed shared-attribute message (%s): %r", exc, data[:200])

    def resync(self) -> None:
        """Redis (re)connected: say again which devices are here; look for the holders of waiting ones."""
        self._queue(self._heartbeat)
        for device_id in {s.device.id for s in self._hub.sessions}:
            self._queue(lambda d=device_id: self._hold(d))  # type: ignore[misc]
        self._recheck()

    def on_message(self, data: bytes) -> None:
        """A message on this process's channel."""
        try:
            message = orjson.loads(data)
            handler = self._handlers[message["t"]]
            handler(message)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("ignored a malformed router message (%s): %r", exc, data[:200])

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Runs directory operations one at a time, in order (an attach and the detach after it must reach
        Redis in that order); heartbeat and re-check on their periods."""
        loop = asyncio.get_running_loop()
        next_beat = next_check = loop.time()
        while not self._closed:
            now = loop.time()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                self._queue(self._heartbeat)
                self._sweep_tickets()
            if now >= next_check:
                next_check = now + RECHECK_S
                self._recheck()
            try:
                async with asyncio.timeout(max(0.0, min(next_beat, next_check) - loop.time())):
                    op = await self._ops.get()
            except TimeoutError:
                continue
            await self._run_op(op)

    async def _run_op(self, op: Op) -> None:
        try:
            await op()
        except Errors as exc:
            self._dir.failed(exc)

    async def aclose(self) -> None:
        """Clean stop (after the hub closed): other processes stop sending here at once."""
        self._closed = True
        if self._dir.up:
            with contextlib.suppress(*Errors):
                await self._dir.gone(self.id)
                for device_id in {s.device.id for s in self._hub.sessions}:
                    await self._dir.release(device_id, self.id)

    def _queue(self, op: Op) -> None:
        if not self._closed:
            self._ops.put_nowait(op)

    # ------------------------------------------------------------------ directory operations

    async def _heartbeat(self) -> None:
        if self._dir.up:
            await self._dir.heartbeat(self.id, ALIVE_TTL_MS)

    async def _hold(self, device_id: str) -> None:
        if not self._dir.up or not self._hub.sessions.holds(device_id):
            return
        for worker in await self._dir.hold(device_id, self.id):
            if worker != self.id:
                await self._dir.publish(worker, orjson.dumps({"t": "attached", "device": device_id, "holder": self.id}))

    async def _release(self, device_id: str) -> None:
        if self._dir.up and not self._hub.sessions.holds(device_id):
            await self._dir.release(device_id, self.id)

    async def _route(self, device_id: str) -> None:
        """Requests wait here for a device no session here holds: send them to its holder, or wait for one."""
        if not self._dir.up or self._hub.sessions.holds(device_id):
            return
        until = self._hub.rpc.waiting_until(device_id)
        if until is None:
            return
        holder = await self._dir.holder_or_wait(device_id, self.id, max(1, until - self._clock_ms()))
        if holder is not None and holder != self.id:
            await self._forward(device_id, holder)

    async def _forward(self, device_id: str, holder: str) -> None:
        for request, future in self._hub.hand_off(device_id):
            reply_to, ticket = self._remote.pop((device_id, request.id), (None, 0))
            if reply_to is None and future is not None:
                reply_to, ticket = self.id, self._ticket(future, request)
            message = _request_message(request, self._hub.identity(device_id), reply_to, ticket)
            try:
                await self._dir.publish(holder, orjson.dumps(message))
            except Errors as exc:
                self._dir.failed(exc)
                self._accept(message)  # not sent: it waits here again (under a new id, nothing was reported)

    def _recheck(self) -> None:
        for device_id in self._hub.rpc.waiting_devices():
            if not self._hub.sessions.holds(device_id):
                self._queue(lambda d=device_id: self._route(d))  # type: ignore[misc]

    # ------------------------------------------------------------------ messages

    def _accept(self, message: Mapping[str, Any]) -> None:
        """A request handed over (or given back): queued in the hub like one read here."""
        device_id = str(message["device"])
        name = message.get("name")
        request, future = self._hub.send_rpc(
            device_id,
            str(message["method"]),
            message.get("params"),
            oneway=bool(message["oneway"]),
            expires_at=int(message["expires_at"]),
            request_id=message.get("request_id"),
            device=DeviceIdentity(device_id, name if isinstance(name, str) and name else device_id),
        )
        reply_to = message.get("reply_to")
        if isinstance(reply_to, str):
            key = (device_id, request.id)
            self._remote[key] = (reply_to, int(message["ticket"]))
            future.add_done_callback(lambda done: self._finished(key, done))

    def _finished(self, key: tuple[str, int], done: asyncio.Future[RpcOutcome]) -> None:
        """A handed-over request ended here: its caller (``tb-gateway rpc``) hears the outcome."""
        target = self._remote.pop(key, None)
        if target is None or done.cancelled():
            return
        worker, ticket = target
        outcome = done.result()
        r = outcome.request
        message = {
            "t": "outcome",
            "ticket": ticket,
            "request": _request_message(r, self._hub.identity(r.device_id), None, 0),
            "id": r.id,
            "status": outcome.status.value,
            "at": outcome.at,
            "response": outcome.response,
            "transport": outcome.transport.value,
        }
        if worker == self.id:
            self._outcome(message)
        else:
            body = orjson.dumps(message)
            self._queue(lambda: self._dir.publish(worker, body))

    def _outcome(self, message: Mapping[str, Any]) -> None:
        entry = self._tickets.pop(int(message["ticket"]), None)
        if entry is None or entry[0].done():
            return
        r = message["request"]
        request = RpcRequest(
            str(r["device"]),
            int(message["id"]),
            str(r["method"]),
            r.get("params"),
            bool(r["oneway"]),
            int(r["expires_at"]),
            r.get("request_id"),
        )
        status = RpcStatus(message["status"])
        entry[0].set_result(
            RpcOutcome(request, status, int(message["at"]), message.get("response"), Transport(message["transport"]))
        )

    def _attached(self, message: Mapping[str, Any]) -> None:
        device_id, holder = str(message["device"]), str(message["holder"])
        self._queue(lambda: self._forward(device_id, holder))  # nothing to hand over if the device is here

    def _client_reply(self, message: Mapping[str, Any]) -> None:
        device = message.get("device")
        self._hub.client_rpc_reply(
            str(message["id"]), message.get("response"), device if isinstance(device, str) else None
        )

    # ------------------------------------------------------------------ callers waiting here

    def _ticket(self, future: asyncio.Future[RpcOutcome], request: RpcRequest) -> int:
        self._next_ticket += 1
        self._tickets[self._next_ticket] = (future, request)
        return self._next_ticket

    def _sweep_tickets(self) -> None:
        """A caller whose request went to a process that died (or whose outcome was lost) stops waiting: it
        hears ``timeout``. Nothing is reported to the backend for it: the holder's report is what was lost."""
        now = self._clock_ms()
        for ticket, (future, request) in list(self._tickets.items()):
            if future.done():
                del self._tickets[ticket]
            elif request.expires_at + TICKET_GRACE_MS <= now:
                del self._tickets[ticket]
                future.set_result(RpcOutcome(request, RpcStatus.TIMEOUT, now))


def _request_message(
    request: RpcRequest, identity: DeviceIdentity, reply_to: str | None, ticket: int
) -> dict[str, Any]:
    return {
        "t": "rpc",
        "device": request.device_id,
        "name": identity.name,
        "method": request.method,
        "params": request.params,
        "oneway": request.oneway,
        "expires_at": request.expires_at,
        "request_id": request.request_id,
        "reply_to": reply_to,
        "ticket": ticket,
    }


class RedisDirectory:
    """The directory and the channels in Redis, over the connection of the shared cache (``RedisCache``),
    which also reconnects, subscribes this process's channel and says in /health whether Redis is up."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, cache: RedisCache) -> None:
        self._cache = cache
        self._prefix = cache.prefix

    @property
    def up(self) -> bool:
        return self._cache.up

    def failed(self, exc: BaseException) -> None:
        self._cache.failed(exc)

    def channel(self, worker: str) -> str:
        return f"{self._prefix}worker:{worker}"

    async def hold(self, device_id: str, worker: str) -> list[str]:
        waiting = f"{self._prefix}waiting:{device_id}"
        async with self._cache.client.pipeline(transaction=True) as pipe:
            pipe.set(f"{self._prefix}holder:{device_id}", worker)
            pipe.smembers(waiting)
            pipe.delete(waiting)
            _, members, _ = await pipe.execute()
        return sorted(m.decode() for m in members)

    async def release(self, device_id: str, worker: str) -> None:
        await self._cache.client.eval(self._RELEASE, 1, f"{self._prefix}holder:{device_id}", worker)

    async def holder_or_wait(self, device_id: str, worker: str, ttl_ms: int) -> str | None:
        waiting = f"{self._prefix}waiting:{device_id}"
        async with self._cache.client.pipeline(transaction=True) as pipe:
            pipe.sadd(waiting, worker)
            pipe.pexpire(waiting, ttl_ms)
            pipe.get(f"{self._prefix}holder:{device_id}")
            _, _, raw = await pipe.execute()
        if raw is None:
            return None
        holder = str(raw.decode())
        if holder != worker and not await self._cache.client.exists(f"{self._prefix}alive:{holder}"):
            return None  # a process that died holding it: wait for the device to come back somewhere
        return holder

    async def heartbeat(self, worker: str, ttl_ms: int) -> None:
        await self._cache.client.set(f"{self._prefix}alive:{worker}", b"1", px=ttl_ms)

    async def gone(self, worker: str) -> None:
        await self._cache.client.delete(f"{self._prefix}alive:{worker}")

    async def publish(self, worker: str, message: bytes) -> None:
        await self._cache.client.publish(self.channel(worker), message)

    async def broadcast(self, message: bytes) -> None:
        await self._cache.client.publish(self.shared_channel, message)

    @property
    def shared_channel(self) -> str:
        return f"{self._prefix}shared"


def build(hub: Downlink, cache: RedisCache, instance: str) -> Router:
    """The router of a process with REDIS_URL: listens on its channel, writes the directory when Redis is up."""
    directory = RedisDirectory(cache)
    router = Router(hub, directory, now_ms, instance)
    cache.listen(directory.channel(router.id), router.on_message)
    cache.listen(directory.shared_channel, router.on_shared)
    cache.up_listeners.append(router.resync)
    cache.live_devices = lambda: [session.device for session in hub.sessions]  # re-checked after an outage
    return router
