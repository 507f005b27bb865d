"""Device authentication: credentials -> ``DeviceIdentity``, behind an in-process cache.

Transports only ever call ``AuthService.authenticate``. Where identities come from is a list of
``CredentialSource`` objects tried in order (the embedded registry today; a ThingsBoard backend, a Redis
shared cache or X.509 fingerprints plug in as further sources without touching any transport).

Hits are cached for ``ttl_s`` (ThingsBoard's gateway promise: 1 hour), misses for ``negative_ttl_s`` (short,
so a device registered a moment ago gets in quickly while a token-guessing client still costs nothing).
Misses are kept apart from hits, at most a tenth as many: a flood of wrong credentials churns only the
misses and never evicts a device's entry (which would send every device back to the sources).
Concurrent lookups of one credential share a single source query.

Two optional layers (docs/scale-out.md): a ``SharedCache`` asked before the sources and told their answers,
so instances share hits and misses (``redis_cache.py``); and a ``Blocklist`` that refuses an address after
repeated wrong credentials (``blocklist.py``) — active only when the transport passes the peer's ``address``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tb_gateway.blocklist import Blocklist
from tb_gateway.errors import AddressBlocked
from tb_gateway.logs import Throttle
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str


@dataclass(frozen=True, slots=True)
class MqttBasic:
    client_id: str
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class X509Fingerprint:
    sha3_256_hex: str


Credentials = AccessToken | MqttBasic | X509Fingerprint


class CredentialSource(Protocol):
    """Resolves credentials it knows; answers ``None`` for credentials it does not know.

    A source with a true ``remote`` class attribute (``is_remote``) is one every instance shares, such as
    the ThingsBoard backend: a miss cached in the ``SharedCache`` speaks for it, so it is not asked again. The
    others (the embedded registry: each instance has its own, and asking it is cheap) are asked even then.
    """

    name: str

    async def lookup(self, credentials: Credentials) -> DeviceIdentity | None: ...


class SharedCache(Protocol):
    """A cache shared by instances: ``get`` -> ``(known, identity or None, source name)``; errors are its own
    business (it answers ``(False, None, None)`` and does nothing while its backend is down)."""

    async def get(self, credentials: Credentials) -> tuple[bool, DeviceIdentity | None, str | None]: ...

    async def put(
        self, credentials: Credentials, identity: DeviceIdentity | None, source: str | None, ttl_s: float
    ) -> None: ...

    def bind(self, auth: AuthService) -> None:
        """Called once by the ``AuthService`` that uses the cache (its re-check after an outage needs it)."""
        ...


def is_remote(source: CredentialSource) -> bool:
    """A source shared by every instance (``remote = True``): one cached miss in Redis answers for it."""
    return bool(getattr(source, "remote", False))


@dataclass(slots=True)
class _Entry:
    identity: DeviceIdentity | None
    expires_at: float
    source: str | None  # name of the source that knew it; None for a miss


class AuthService:
    # slots: the C lanes read the cache, clock and blocklist at every request (_lanes.c lookup_device)
    __slots__ = (
        "_blocklist",
        "_cache",
        "_clock",
        "_failure_log",
        "_max_entries",
        "_max_misses",
        "_metrics",
        "_misses",
        "_negative_ttl_s",
        "_pending",
        "_shared",
        "_sources",
        "_ttl_s",
    )

    def __init__(
        self,
        sources: Sequence[CredentialSource],
        metrics: Metrics,
        *,
        ttl_s: float,
        negative_ttl_s: float,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCache | None = None,
        blocklist: Blocklist | None = None,
    ) -> None:
        self._sources = list(sources)
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[Credentials, _Entry] = {}  # hits (the C lanes read it too: _lanes.c lookup_device)
        self._misses: dict[Credentials, _Entry] = {}  # misses, at most _max_misses
        self._max_misses = max(1, max_entries // 10)
        self._pending: dict[Credentials, asyncio.Future[DeviceIdentity | None]] = {}
        self._shared = shared
        self._blocklist = blocklist
        if shared is not None:
            shared.bind(self)
        # a wrong token over HTTP or CoAP, logged once per transport and address per minute
        self._failure_log = Throttle(log, period_s=60.0)

    async def authenticate(
        self,
        credentials: Credentials,
        transport: str,
        address: str | None = None,
        fallback: Credentials | None = None,
    ) -> DeviceIdentity | None:
        """The identity for ``credentials`` (else for ``fallback``, as one attempt), or ``None``.

        With the peer's ``address``, a blocked address raises ``AddressBlocked`` before any lookup, and the
        answer counts for or against the address.
        """
        self._check_address(address, transport)
        identity = await self._lookup(credentials)
        if identity is None and fallback is not None:
            identity = await self._lookup(fallback)
        self._count(identity, transport, address)
        return identity

    def cached(
        self, credentials: Credentials, transport: str, address: str | None = None
    ) -> tuple[bool, DeviceIdentity | None]:
        """``authenticate`` from the cache alone, without awaiting: ``(False, None)`` when not cached.

        The hot path of per-request transports (HTTP, CoAP): a cached refusal is counted as ``authenticate``
        would count it; on ``(False, None)`` the caller awaits ``authenticate``.
        """
        self._check_address(address, transport)
        entry = self._cache.get(credentials) or self._misses.get(credentials)
        if entry is None or entry.expires_at <= self._clock():
            return False, None
        self._count(entry.identity, transport, address)
        return True, entry.identity

    def cached_identity(
        self, credentials: Credentials, transport: str, address: str | None = None
    ) -> DeviceIdentity | None:
        """The identity when the cache holds a valid one and the address is not blocked, counted as
        ``cached`` counts it; else ``None`` with nothing counted, so the caller can go on to ``cached``."""
        entry = self._cache.get(credentials)
        if entry is None or entry.identity is None or entry.expires_at <= self._clock():
            return None
        blocklist = self._blocklist
        if address is not None and blocklist is not None:
            if blocklist.blocked_for(address, self._clock()) > 0:
                return None
            blocklist.succeeded(address)
        return entry.identity

    async def _lookup(self, credentials: Credentials) -> DeviceIdentity | None:
        entry = self._cache.get(credentials) or self._misses.get(credentials)
        if entry is not None and entry.expires_at > self._clock():
            return entry.identity
        return await self._resolve(credentials)

    def _check_address(self, address: str | None, transport: str) -> None:
        if address is None or self._blocklist is None:
            return
        wait = self._blocklist.blocked_for(address, self._clock())
        if wait > 0:
            self._metrics.auth_blocked.labels(transport=transport).inc()
            raise AddressBlocked(address, wait)

    def _count(self, identity: DeviceIdentity | None, transport: str, address: str | None) -> None:
        if identity is None:
            self._metrics.auth_failures.labels(transport=transport).inc()
            if transport != "mqtt":  # MQTT logs its refused CONNECT itself, with the client id and user name
                self._failure_log.warning(
                    (transport, address), "refused unknown credentials over %s from %s", transport, address or "-"
                )
        blocklist = self._blocklist
        if address is None or blocklist is None:
            return
        if identity is not None:
            blocklist.succeeded(address)
        elif blocklist.failed(address, self._clock()):
            log.warning(
                "address %s blocked for %.0f s after %d wrong credentials",
                address,
                blocklist.block_s,
                blocklist.max_failures,
            )

    async def _resolve(self, credentials: Credentials) -> DeviceIdentity | None:
        pending = self._pending.get(credentials)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[DeviceIdentity | None] = asyncio.get_running_loop().create_future()
        self._pending[credentials] = future
        try:
            identity, source = await self._ask_sources(credentials)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._pending[credentials]
        future.set_result(identity)
        self._remember(credentials, identity, source)
        return identity

    async def _ask_sources(self, credentials: Credentials) -> tuple[DeviceIdentity | None, str | None]:
        """The shared cache first; a hit there is final, a miss only for remote sources: another instance
        cached it, whose own registry may not know a device this instance's registry knows."""
        shared = self._shared
        shared_miss = False
        if shared is not None:
            known, identity, name = await shared.get(credentials)
            if known and identity is not None:
                return identity, name
            shared_miss = known
        identity, name = None, None
        for source in self._sources:
            if shared_miss and is_remote(source):
                continue
            identity = await source.lookup(credentials)
            if identity is not None:
                name = source.name
                break
        if shared is not None and not (shared_miss and identity is None):  # a hit replaces the shared miss
            await shared.put(credentials, identity, name, self._ttl_s if identity is not None else self._negative_ttl_s)
        return identity, name

    def credentials_by_device(self) -> dict[str, list[Credentials]]:
        """Device id -> the credentials the cache holds for it, expired answers included (a live session
        outlives its cache entry): what a device's live sessions may have authenticated with."""
        known: dict[str, list[Credentials]] = {}
        for credentials, entry in self._cache.items():
            if entry.identity is not None:
                known.setdefault(entry.identity.id, []).append(credentials)
        return known

    async def still_knows(self, device_id: str, candidates: Sequence[Credentials]) -> bool | None:
        """Whether any of ``candidates`` still resolves to ``device_id``, asked afresh (shared cache, then the
        sources, as a new connection would be; the answers are cached). ``None``: a source could not answer
        (``CredentialsUnavailable``, an error), so nobody can tell."""
        unsure = False
        for credentials in candidates:
            try:
                identity = await self._resolve(credentials)
            except Exception as exc:  # any failure means "cannot tell", never "gone"
                log.warning("could not re-check the credentials of device %s: %s", device_id, exc)
                unsure = True
                continue
            if identity is not None and identity.id == device_id:
                return True
        return None if unsure else False

    def _remember(self, credentials: Credentials, identity: DeviceIdentity | None, source: str | None) -> None:
        if identity is None:
            entries, other, limit, ttl = self._misses, self._cache, self._max_misses, self._negative_ttl_s
        else:
            entries, other, limit, ttl = self._cache, self._misses, self._max_entries, self._ttl_s
        other.pop(credentials, None)  # the answer changed: one entry per credential
        if len(entries) >= limit and credentials not in entries:
            # dicts keep insertion order: drop the oldest tenth in one go rather than one per insert
            for key in list(entries)[: max(1, limit // 10)]:
                del entries[key]
        entries[credentials] = _Entry(identity, self._clock() + ttl, source)

    async def close(self) -> None:
        """Release what sources hold (the ThingsBoard source's connection pool); the app calls it at shutdown."""
        for source in self._sources:
            close = getattr(source, "close", None)
            if close is not None:
                await close()

    def invalidate_source(self, name: str) -> int:
        """Forget what one source answered, and every miss (the source may know those now)."""
        doomed = [key for key, entry in self._cache.items() if entry.source in (name, None)]
        for key in doomed:
            del self._cache[key]
        dropped = len(doomed) + len(self._misses)
        self._misses.clear()
        return dropped

    def invalidate(self, predicate: Callable[[Credentials, DeviceIdentity | None], bool] | None = None) -> int:
        """Forget cached answers (all, or those matching); returns how many were dropped."""
        if predicate is None:
            dropped = len(self._cache) + len(self._misses)
            self._cache.clear()
            self._misses.clear()
            return dropped
        dropped = 0
        for entries in (self._cache, self._misses):
            doomed = [key for key, entry in entries.items() if predicate(key, entry.identity)]
            for key in doomed:
                del entries[key]
            dropped += len(doomed)
        return dropped
