"""The shared credential cache against a real redis-server: sharing hits and misses, TTLs, revocation,
session take-over, and life without Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tb_gateway.auth import AccessToken, AuthService, MqttBasic
from tb_gateway.errors import CredentialsUnavailable
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity
from tb_gateway.redis_cache import RedisCache, credential_key, revoke_device
from tests.harness.redis import RedisServer
from tests.support import TokenSource


@dataclass
class Instance:
    """One gateway's auth layer: its own sources and local cache, the shared Redis behind."""

    source: TokenSource
    auth: AuthService
    cache: RedisCache
    metrics: Metrics
    revoked: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)
    reconnects: int = 0


class RemoteSource(TokenSource):
    """A source every instance shares (as the ThingsBoard backend): a miss cached in Redis answers for it."""

    remote = True


@asynccontextmanager
async def instance(
    url: str, tokens: dict[str, str], negative_ttl_s: float = 5.0, remote: bool = False
) -> AsyncIterator[Instance]:
    metrics = Metrics()
    source = RemoteSource(tokens) if remote else TokenSource(tokens)
    box: list[Instance] = []

    def revoked(device_id: str) -> None:  # as Gateway.device_revoked, but the sessions closed are a list
        box[0].revoked.append(device_id)
        box[0].auth.invalidate(lambda _c, identity: identity is not None and identity.id == device_id)

    def reconnected() -> None:  # as the gateway: the local cache is dropped
        box[0].reconnects += 1
        box[0].auth.invalidate()

    cache = RedisCache(
        url,
        metrics,
        timeout_s=0.3,
        on_revoked=revoked,
        on_taken_over=lambda device_id: box[0].taken_over.append(device_id),
        on_reconnected=reconnected,
    )
    auth = AuthService([source], metrics, ttl_s=60, negative_ttl_s=negative_ttl_s, shared=cache)
    box.append(Instance(source, auth, cache, metrics))
    task = asyncio.create_task(cache.run())
    try:
        await until(lambda: cache.up, 5.0)
        yield box[0]
    finally:
        await cache.close()
        await asyncio.wait_for(task, 5.0)


async def until(condition: Callable[[], bool], timeout_s: float) -> float:
    """Wait for ``condition``; returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_instances_share_hits_and_misses(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}) as a, instance(redis_server.url, {}) as b:
            device = await a.auth.authenticate(AccessToken("T1"), "http")
            assert device == DeviceIdentity("id-dev1", "dev1", "default", "T1")
            # B's own sources do not know T1: Redis answers, B's source is never asked
            assert await b.auth.authenticate(AccessToken("T1"), "mqtt") == device
            assert b.source.lookups == 0
            # a miss learned by B: A still asks its own (local) registry, which may know what B's does not
            assert await b.auth.authenticate(AccessToken("guess"), "coap") is None
            assert await a.auth.authenticate(AccessToken("guess"), "coap") is None
            assert (a.source.lookups, b.source.lookups) == (2, 1)
            # MQTT basic credentials are separate keys: same user name as a token, different answer
            assert await b.auth.authenticate(MqttBasic("c", "T1", "pw"), "mqtt") is None
            assert b.source.lookups == 2

    run(scenario)


def test_a_miss_cached_elsewhere_does_not_hide_a_device_the_local_registry_knows(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {"T2": "dev2"}) as a, instance(redis_server.url, {}) as b:
            assert await b.auth.authenticate(AccessToken("T2"), "http") is None  # B's registry: unknown; cached
            device = await a.auth.authenticate(AccessToken("T2"), "http")  # A's registry knows it
            assert device is not None and device.name == "dev2"
            # and the hit replaced the shared miss: an instance that did not ask yet learns it from Redis
            async with instance(redis_server.url, {}) as c:
                assert await c.auth.authenticate(AccessToken("T2"), "mqtt") == device

    run(scenario)


def test_a_shared_miss_answers_for_remote_sources(redis_server: RedisServer) -> None:
    """A token guessed on one instance costs the backend (a remote source, the same for all) nothing more."""

    async def scenario() -> None:
        async with (
            instance(redis_server.url, {}, remote=True) as a,
            instance(redis_server.url, {}, remote=True) as b,
        ):
            assert await a.auth.authenticate(AccessToken("guess"), "http") is None
            assert await b.auth.authenticate(AccessToken("guess"), "http") is None
            assert (a.source.lookups, b.source.lookups) == (1, 0)

    run(scenario)


def test_sessions_of_a_device_removed_during_an_outage_close_when_redis_is_back(redis_server: RedisServer) -> None:
    """Revocations published while Redis is away are lost; on reconnecting an instance looks its live sessions'
    credentials up afresh and closes (as a revocation does) the devices they no longer name."""

    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}) as a, instance(redis_server.url, {}) as b:
            b.source.tokens.update({"T2": "dev2", "T4": "dev4"})
            assert await a.auth.authenticate(AccessToken("T1"), "http") is not None
            dev1 = await b.auth.authenticate(AccessToken("T1"), "mqtt")  # learned from Redis (A's registry)
            dev2 = await b.auth.authenticate(AccessToken("T2"), "mqtt")  # B's own registry
            dev4 = await b.auth.authenticate(AccessToken("T4"), "mqtt")
            assert dev1 is not None and dev2 is not None and dev4 is not None
            basic = DeviceIdentity("id-basic", "basic")  # no token, nothing cached: cannot be asked about
            b.cache.live_devices = lambda: [dev1, dev2, dev4, basic]  # the router's live sessions
            redis_server.stop()
            await until(lambda: not b.cache.up and not a.cache.up, 3.0)
            del a.source.tokens["T1"]  # removed meanwhile: nobody hears the revocation
            del b.source.tokens["T2"]
            lookups = b.source.lookups
            redis_server.start()  # empty again (no persistence), as after a Redis restart
            await until(lambda: b.reconnects == 1, 5.0)
            await until(lambda: sorted(b.revoked) == ["id-dev1", "id-dev2"], 2.0)
            await asyncio.sleep(0.2)
            assert sorted(b.revoked) == ["id-dev1", "id-dev2"]  # dev4 still known, "basic" left alone
            assert b.source.lookups == lookups + 3  # one fresh lookup per device with credentials
            # the re-check's answers are cached: dev4 connecting again costs nothing more
            assert await b.auth.authenticate(AccessToken("T4"), "mqtt") == dev4
            assert b.source.lookups == lookups + 3

    run(scenario)


def test_the_re_check_keeps_a_device_nobody_can_vouch_against(redis_server: RedisServer) -> None:
    """A source that cannot answer (ThingsBoard unreachable) is no reason to close a session."""

    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}) as a:
            dev1 = await a.auth.authenticate(AccessToken("T1"), "mqtt")
            assert dev1 is not None
            a.cache.live_devices = lambda: [dev1]
            redis_server.stop()
            await until(lambda: not a.cache.up, 3.0)

            async def unavailable(credentials: object) -> DeviceIdentity | None:
                raise CredentialsUnavailable("ThingsBoard unreachable")

            a.source.lookup = unavailable  # type: ignore[method-assign]
            redis_server.start()
            await until(lambda: a.reconnects == 1, 5.0)
            await asyncio.sleep(0.3)
            assert a.revoked == []

    run(scenario)


def test_ttls_and_keys(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}, negative_ttl_s=0.3) as a:
            await a.auth.authenticate(AccessToken("T1"), "http")
            await a.auth.authenticate(AccessToken("nope"), "http")
            redis = Redis.from_url(redis_server.url)
            try:
                hit, miss = credential_key("tbgw:", AccessToken("T1")), credential_key("tbgw:", AccessToken("nope"))
                assert 59_000 < await redis.pttl(hit) <= 60_000  # AUTH_CACHE_TTL_SECONDS
                assert 0 < await redis.pttl(miss) <= 300  # AUTH_NEGATIVE_CACHE_TTL_SECONDS
                assert await redis.smembers("tbgw:dev:id-dev1") == {hit.encode()}
                keys = [key.decode() for key in await redis.keys("*")]
                assert not any("T1" in key or "nope" in key for key in keys)  # digests, never the secret
                await asyncio.sleep(0.4)
                assert await redis.exists(miss) == 0
                # a value that is not ours is ignored (the sources answer, and overwrite it)
                await redis.set(hit, b"{not json")
                a.auth.invalidate()
                assert await a.auth.authenticate(AccessToken("T1"), "http") is not None
                assert b'"dev1"' in (await redis.get(hit) or b"")
            finally:
                await redis.aclose()

    run(scenario)


def test_revocation_reaches_every_instance_at_once(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}) as a, instance(redis_server.url, {}) as b:
            assert await a.auth.authenticate(AccessToken("T1"), "http") is not None
            assert await b.auth.authenticate(AccessToken("T1"), "http") is not None
            a.source.tokens.clear()  # the device is removed from the source of truth
            heard = await revoke_device(redis_server.url, "id-dev1")
            assert heard == 2
            took = await until(lambda: a.revoked == ["id-dev1"] == b.revoked, 2.0)
            assert took < 0.5
            assert await b.auth.authenticate(AccessToken("T1"), "http") is None  # not cached anywhere any more
            assert await a.auth.authenticate(AccessToken("T1"), "http") is None
            assert a.metrics.registry.get_sample_value("tb_gateway_revocations_total", {"origin": "redis"}) == 1
            # a malformed message is ignored; a well-formed one from any publisher (the backend) is applied
            assert redis_server.command(b"PUBLISH", b"tbgw:revoked", b"garbage") == b":2"
            assert redis_server.command(b"PUBLISH", b"tbgw:revoked", b'{"device_id":42}') == b":2"
            assert redis_server.command(b"PUBLISH", b"tbgw:revoked", b'{"device_id":"id-x"}') == b":2"
            await until(lambda: len(b.revoked) == 2, 2.0)
            assert b.revoked == ["id-dev1", "id-x"]

    run(scenario)


def test_a_session_elsewhere_closes_the_local_one(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {}) as a, instance(redis_server.url, {}) as b:
            b.cache.announce_session("id-dev1", time.time())
            took = await until(lambda: a.taken_over == ["id-dev1"], 2.0)
            assert took < 0.1  # published at once, not at the next poll
            # two announcements crossing: each instance keeps the newer connection
            a.cache.announce_session("id-dev2", 2000.0)
            b.cache.announce_session("id-dev2", 1000.0)
            await until(lambda: b.taken_over == ["id-dev2"], 2.0)
            await asyncio.sleep(0.3)
            assert a.taken_over == ["id-dev1"]  # b's announcement is older than a's own connect
            assert b.taken_over == ["id-dev2"]  # never its own announcements
            for bad in (b"[1,2]", b'{"device_id":"x","at":"soon"}', b"\xff"):
                assert redis_server.command(b"PUBLISH", b"tbgw:sessions", bad) == b":2"
            await asyncio.sleep(0.3)
            assert a.taken_over == ["id-dev1"] and b.taken_over == ["id-dev2"]

    run(scenario)


def test_redis_down_the_local_cache_carries_on(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with instance(redis_server.url, {"T1": "dev1"}) as a:
            assert a.cache.health()["status"] == "up"
            assert a.metrics.registry.get_sample_value("tb_gateway_redis_up") == 1
            await a.auth.authenticate(AccessToken("T1"), "http")
            redis_server.stop()
            await until(lambda: not a.cache.up, 3.0)
            health = a.cache.health()
            assert health["status"] == "degraded" and health["error"]
            assert a.metrics.registry.get_sample_value("tb_gateway_redis_up") == 0
            # cached: still answered; new credentials: straight to the sources, without waiting on Redis
            assert await a.auth.authenticate(AccessToken("T1"), "http") is not None
            a.source.tokens["T2"] = "dev2"
            start = time.monotonic()
            assert await a.auth.authenticate(AccessToken("T2"), "http") is not None
            assert time.monotonic() - start < 0.1
            a.cache.announce_session("id-dev1", time.time())  # dropped, nobody could hear it
            redis_server.start()
            await until(lambda: a.cache.up, 5.0)
            assert a.reconnects == 1  # the local cache is dropped: revocations may have been missed
            assert a.cache.health()["status"] == "up"

    run(scenario)


def test_unreachable_redis_at_start(redis_server: RedisServer) -> None:
    dead = RedisServer(redis_server.workdir / "dead")  # a free port nobody listens on

    async def scenario() -> None:
        metrics = Metrics()
        cache = RedisCache(f"redis://:secret@127.0.0.1:{dead.port}/0", metrics, timeout_s=0.2)
        auth = AuthService([TokenSource({"T1": "dev1"})], metrics, ttl_s=60, negative_ttl_s=5, shared=cache)
        task = asyncio.create_task(cache.run())
        await asyncio.sleep(0.3)
        assert await auth.authenticate(AccessToken("T1"), "http") is not None
        health = cache.health()
        assert health["status"] == "degraded" and "secret" not in str(health)
        await cache.close()
        await asyncio.wait_for(task, 5.0)

    run(scenario)


def test_revoke_device_without_redis_raises() -> None:
    with pytest.raises(RedisConnectionError):
        asyncio.run(revoke_device("redis://127.0.0.1:1/0", "id", timeout_s=0.2))
