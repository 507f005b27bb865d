"""Redis as the instances' shared memory: credential cache, revocations, session take-over (REDIS_URL).

Why Redis and nothing home-made (DESIGN.md §3): instances stay stateless; Redis holds what they share.

* Credential cache — the second layer of ``AuthService`` (``SharedCache``): asked before the credential
  sources, told their answers, with the same TTLs (AUTH_CACHE_TTL_SECONDS for hits,
  AUTH_NEGATIVE_CACHE_TTL_SECONDS for misses). A device looked up by one instance costs the others nothing;
  a token-guessing client costs one source query per token across the whole fleet. Keys are SHA-256 digests
  of the credentials (no token or password appears in a key); a per-device set lists a device's keys so a
  revocation can delete them.
* Revocations — ``revoke(device_id)`` (``tb-gateway device remove``, or anyone publishing
  ``{"device_id": ...}`` on ``<prefix>revoked``) deletes the device's keys and reaches every instance by
  pub/sub at once: each drops its local cache entries and closes the device's live sessions (``on_revoked``).
* Session take-over — an instance that accepts a device's connection announces it (with the time) on
  ``<prefix>sessions``; the others close their older session of it (``on_taken_over``), as ThingsBoard allows
  one session per device (spec §1.1).

Redis down: lookups skip it at once (no waiting on a dead server), the gateway runs on its local cache, and
``health()`` says ``degraded``. Revocations published meanwhile cannot reach an instance that does not hear
Redis, so on reconnecting it drops its whole local cache (``on_reconnected``) and re-checks the devices of
its live sessions (``live_devices``, given by the downlink router): each one's credentials are looked up
afresh (Redis, then the sources, as a new connection would be), and a device they no longer name is closed
the way a revocation closes it (``on_revoked``). The bound on a missed revocation is the outage itself (plus
the re-check), not a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tb_gateway.auth import AccessToken, AuthService, Credentials, MqttBasic, X509Fingerprint
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity

log = logging.getLogger(__name__)

RECONNECT_S = 1.0  # pause between attempts to reach Redis again; also how often a lost Redis is checked
POLL_S = 0.2  # the subscriber's wait for a message before it looks at its outbox and the health
MAX_ANNOUNCEMENTS = 10_000  # session announcements waiting to be published; beyond it the oldest go
RACE_S = 10.0  # how long a local connect is remembered to tell which of two crossing announcements is newer
MISS = b"-"  # the value of a cached miss
RECHECK_CONCURRENCY = 8  # live sessions' devices re-checked at once after an outage (each may ask ThingsBoard)

Errors = (RedisError, OSError, TimeoutError)


def credential_key(prefix: str, credentials: Credentials) -> str:
    """A digest, never the secret itself; the type is part of it so a token cannot collide with basic creds."""
    parts = _FIELDS[type(credentials)](credentials)
    digest = hashlib.sha256(orjson.dumps(parts)).hexdigest()
    return f"{prefix}cred:{digest}"


_FIELDS: dict[type, Callable[[Any], list[str]]] = {
    AccessToken: lambda c: ["token", c.token],
    MqttBasic: lambda c: ["basic", c.client_id, c.username, c.password],
    X509Fingerprint: lambda c: ["x509", c.sha3_256_hex],
}


def client(url: str, timeout_s: float) -> Redis:
    """No retries inside redis-py: a failed command marks Redis down and the local cache answers."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisCache:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        prefix: str = "tbgw:",
        timeout_s: float = 0.5,
        on_revoked: Callable[[str], object] = lambda device_id: None,
        on_taken_over: Callable[[str], object] = lambda device_id: None,
        on_reconnected: Callable[[], object] = lambda: None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.instance = uuid.uuid4().hex
        self._redis = client(url, timeout_s)
        self._metrics = metrics
        self._on_revoked = on_revoked
        self._on_taken_over = on_taken_over
        self._on_reconnected = on_reconnected
        self._up = False
        self._ever_up = False
        self._down_logged = False
        self._last_error = "not connected yet"
        self._outbox: list[tuple[str, float]] = []  # (device id, when) of new sessions to announce
        self._wake = asyncio.Event()
        self._connected: OrderedDict[str, float] = OrderedDict()  # recent local connects, oldest first
        self._handlers: dict[str, Callable[[bytes], None]] = {
            f"{prefix}revoked": self._revoked,
            f"{prefix}sessions": self._session_elsewhere,
        }
        self._closed = asyncio.Event()
        self.up_listeners: list[Callable[[], object]] = []  # every (re)connection, the first included
        # the devices of this process's live sessions (set by the downlink router): re-checked on reconnecting
        self.live_devices: Callable[[], Iterable[DeviceIdentity]] | None = None
        self._auth: AuthService | None = None
        self._recheck: asyncio.Task[None] | None = None
        metrics.redis_up.set(0)

    def bind(self, auth: AuthService) -> None:
        """``SharedCache``: the auth service whose answers this caches (the re-check after an outage asks it)."""
        self._auth = auth

    def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Also subscribe to ``channel`` (before ``run``): the downlink router's per-process channel."""
        self._handlers[channel] = handler

    @property
    def client(self) -> Redis:
        """The connection, for other users of the same Redis (the downlink router); check ``up`` first."""
        return self._redis

    def failed(self, exc: BaseException) -> None:
        """Another user's command failed: Redis counts as down until the subscriber reaches it again."""
        self._down(exc)

    # --- SharedCache (auth.py) ---------------------------------------------------------------------------

    async def get(self, credentials: Credentials) -> tuple[bool, DeviceIdentity | None, str | None]:
        if not self._up:
            return False, None, None
        try:
            raw = await self._redis.get(credential_key(self.prefix, credentials))
        except Errors as exc:
            self._down(exc)
            return False, None, None
        if raw is None:
            return False, None, None
        if raw == MISS:
            return True, None, None
        try:
            entry = orjson.loads(raw)
            identity = DeviceIdentity(entry["id"], entry["name"], entry["type"], entry.get("token", ""))
            return True, identity, entry.get("source") or None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False, None, None  # not ours or damaged: ask the sources (whose answer overwrites it)

    async def put(
        self, credentials: Credentials, identity: DeviceIdentity | None, source: str | None, ttl_s: float
    ) -> None:
        if not self._up:
            return
        key = credential_key(self.prefix, credentials)
        ttl_ms = max(1, int(ttl_s * 1000))
        try:
            if identity is None:
                await self._redis.set(key, MISS, px=ttl_ms)
                return
            value = {"id": identity.id, "name": identity.name, "type": identity.type, "token": identity.token}
            value["source"] = source or ""
            index = f"{self.prefix}dev:{identity.id}"
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(key, orjson.dumps(value), px=ttl_ms)
                pipe.sadd(index, key)
                pipe.pexpire(index, ttl_ms)
                await pipe.execute()
        except Errors as exc:
            self._down(exc)

    # --- revocation and take-over --------------------------------------------------------------------------

    async def revoke(self, device_id: str) -> int:
        """Delete the device's cached credentials and tell every instance; returns how many heard it."""
        return await _revoke(self._redis, self.prefix, device_id)

    def announce_session(self, device_id: str, at: float) -> None:
        """A device connected here at ``at`` (epoch seconds): other instances close their older session of it."""
        if not self._up:
            return  # nobody can hear it; a device does not connect to two instances during an outage anyway
        if len(self._outbox) >= MAX_ANNOUNCEMENTS:
            del self._outbox[: MAX_ANNOUNCEMENTS // 10]
        self._outbox.append((device_id, at))
        self._wake.set()
        connected = self._connected
        connected.pop(device_id, None)
        connected[device_id] = at
        while connected and (len(connected) > MAX_ANNOUNCEMENTS or next(iter(connected.values())) < at - RACE_S):
            connected.popitem(last=False)

    # --- the background task -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, apply what arrives, publish announcements; reconnect every RECONNECT_S while Redis is away."""
        while not self._closed.is_set():
            try:
                await self._serve()
            except* Errors as failed:
                self._down(failed.exceptions[0])
            try:
                async with asyncio.timeout(RECONNECT_S):
                    await self._closed.wait()
            except TimeoutError:
                pass

    async def _serve(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*self._handlers)
            await self._redis.ping()
            self._recovered()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._listen(pubsub))
                tasks.create_task(self._publish())
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: PubSub) -> None:
        while not self._closed.is_set():
            message = await pubsub.get_message(timeout=POLL_S)
            if message is not None:
                self._handlers[message["channel"].decode()](message["data"])
            if not self._up:  # a command failed meanwhile: is Redis really away?
                await self._redis.ping()
                self._recovered()

    async def _publish(self) -> None:
        """Announcements leave as soon as they are made (a device moving between instances waits on this)."""
        while not self._closed.is_set():
            while self._outbox:
                device_id, at = self._outbox[0]
                body = orjson.dumps({"device_id": device_id, "instance": self.instance, "at": at})
                await self._redis.publish(f"{self.prefix}sessions", body)
                self._outbox.pop(0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    def _revoked(self, data: bytes) -> None:
        device_id = _device_id(data)
        if device_id is None:
            log.warning("ignored a revocation message that names no device: %r", data[:200])
            return
        log.info("device %s revoked: dropping cached credentials and closing its sessions", device_id)
        self._metrics.revocations.labels(origin="redis").inc()
        self._on_revoked(device_id)

    def _session_elsewhere(self, data: bytes) -> None:
        device_id = _device_id(data)
        try:
            message = orjson.loads(data)
            instance, at = message.get("instance"), float(message.get("at", 0.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return
        if device_id is None or instance == self.instance:
            return
        if self._connected.get(device_id, 0.0) > at:
            return  # the device connected here after it connected there: ours is the live one
        self._on_taken_over(device_id)

    def _recovered(self) -> None:
        if self._up:
            return
        self._up = True
        self._down_logged = False
        self._metrics.redis_up.set(1)
        if self._ever_up:
            log.warning("Redis is back: dropping the local credential cache (revocations may have been missed)")
            known = self._auth.credentials_by_device() if self._auth is not None else {}
            self._on_reconnected()
            self._start_recheck(known)
        else:
            log.info("Redis connected: shared credential cache at %s", _safe(self.url))
        self._ever_up = True
        for listener in self.up_listeners:
            listener()

    def _start_recheck(self, known: Mapping[str, list[Credentials]]) -> None:
        if self._auth is None or self.live_devices is None:
            return
        if self._recheck is not None:
            self._recheck.cancel()  # a newer outage ended: start over with what is live now
        devices = {device.id: device for device in self.live_devices()}
        if devices:
            self._recheck = asyncio.get_running_loop().create_task(self._recheck_sessions(devices, known))

    async def _recheck_sessions(
        self, devices: Mapping[str, DeviceIdentity], known: Mapping[str, list[Credentials]]
    ) -> None:
        """Close the live sessions of devices whose credentials no longer name them (revoked while Redis was
        away). A device whose credentials are unknown here, or whose sources cannot answer, keeps its sessions."""
        auth = self._auth
        assert auth is not None
        pending = iter(devices.values())
        gone: list[str] = []

        async def worker() -> None:
            for device in pending:
                candidates = list(known.get(device.id, ()))
                if device.token and AccessToken(device.token) not in candidates:
                    candidates.append(AccessToken(device.token))
                if not candidates:
                    continue  # how it authenticated is forgotten here: nothing to ask
                verdict = await auth.still_knows(device.id, candidates)
                if not self._up:
                    return  # Redis went away again: without it a device other instances know looks gone
                if verdict is False:
                    gone.append(device.id)
                    log.warning(
                        "device %s is no longer known after the Redis outage: closing its sessions", device.name
                    )
                    self._on_revoked(device.id)

        try:
            await asyncio.gather(*(worker() for _ in range(min(RECHECK_CONCURRENCY, len(devices)))))
        except Exception:
            log.exception("re-checking the live sessions after the Redis outage failed")
            return
        if self._up:
            log.info("re-checked %d live device(s) after the Redis outage: %d no longer known", len(devices), len(gone))

    def _down(self, exc: BaseException) -> None:
        if self._closed.is_set():
            return  # our own close() cut the connection
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not self._down_logged:  # one line per outage, not one per attempt
            log.warning("Redis unavailable, running on the local cache: %s", self._last_error)
            self._down_logged = True
        self._up = False
        self._metrics.redis_up.set(0)

    def health(self) -> dict[str, Any]:
        """``degraded`` while Redis is away: the gateway works, but instances no longer share what they learn."""
        if self._up:
            return {"status": "up", "url": _safe(self.url)}
        return {"status": "degraded", "url": _safe(self.url), "error": self._last_error}

    @property
    def up(self) -> bool:
        return self._up

    async def close(self) -> None:
        self._closed.set()
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        await self._redis.aclose()


def _device_id(data: bytes) -> str | None:
    try:
        device_id = orjson.loads(data).get("device_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return device_id if isinstance(device_id, str) and device_id else None


def _safe(url: str) -> str:
    """The URL without its password, for logs and /health."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


async def _revoke(redis: Redis, prefix: str, device_id: str) -> int:
    index = f"{prefix}dev:{device_id}"
    keys = await redis.smembers(index)
    await redis.delete(index, *keys)
    return int(await redis.publish(f"{prefix}revoked", orjson.dumps({"device_id": device_id})))


async def revoke_device(url: str, device_id: str, prefix: str = "tbgw:", timeout_s: float = 2.0) -> int:
    """For the CLI: revoke once, then disconnect; returns how many gateway instances heard it."""
    redis = client(url, timeout_s)
    try:
        return await _revoke(redis, prefix, device_id)
    finally:
        await redis.aclose()
