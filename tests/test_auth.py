"""AuthService: cache for hits and misses, coalesced lookups, failure metric, invalidation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tb_gateway.app import Gateway
from tb_gateway.auth import AccessToken, AuthService, Credentials, is_remote
from tb_gateway.config import Settings
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity
from tests.support import TokenSource


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[AuthService, TokenSource, Clock, Metrics]:
    source, clock, metrics = TokenSource({"good": "dev"}), Clock(), Metrics()
    return AuthService([source], metrics, ttl_s=3600, negative_ttl_s=5, clock=clock), source, clock, metrics


def failures(metrics: Metrics, transport: str) -> float:
    value = metrics.registry.get_sample_value("tb_gateway_auth_failures_total", {"transport": transport})
    return value or 0.0


def test_hits_cached_for_the_ttl_misses_for_the_short_ttl() -> None:
    auth, source, clock, metrics = make()

    async def main() -> None:
        assert (await auth.authenticate(AccessToken("good"), "http")).name == "dev"  # type: ignore[union-attr]
        assert await auth.authenticate(AccessToken("bad"), "mqtt") is None
        assert source.lookups == 2
        clock.now = 4.9
        await auth.authenticate(AccessToken("good"), "http")
        assert await auth.authenticate(AccessToken("bad"), "mqtt") is None
        assert source.lookups == 2  # both answered from the cache
        clock.now = 5.1
        assert await auth.authenticate(AccessToken("bad"), "coap") is None
        assert source.lookups == 3  # the miss expired
        clock.now = 3599
        await auth.authenticate(AccessToken("good"), "http")
        assert source.lookups == 3
        clock.now = 3601
        await auth.authenticate(AccessToken("good"), "http")
        assert source.lookups == 4

    asyncio.run(main())
    assert failures(metrics, "mqtt") == 2
    assert failures(metrics, "coap") == 1
    assert failures(metrics, "http") == 0


def test_a_device_added_later_gets_in_once_the_miss_expires() -> None:
    auth, source, clock, _ = make()

    async def main() -> None:
        assert await auth.authenticate(AccessToken("late"), "http") is None
        source.tokens["late"] = "late-dev"
        clock.now = 6
        assert await auth.authenticate(AccessToken("late"), "http") is not None

    asyncio.run(main())


def test_concurrent_lookups_share_one_source_query() -> None:
    class Slow(TokenSource):
        async def lookup(self, credentials):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.01)
            return await super().lookup(credentials)

    slow = Slow({"good": "dev"})
    auth = AuthService([slow], Metrics(), ttl_s=10, negative_ttl_s=1)

    async def main() -> None:
        results = await asyncio.gather(*(auth.authenticate(AccessToken("good"), "http") for _ in range(50)))
        assert {r.name for r in results if r} == {"dev"}

    asyncio.run(main())
    assert slow.lookups == 1


def test_sources_are_asked_in_order_until_one_knows() -> None:
    first, second = TokenSource({"a": "from-first"}), TokenSource({"a": "from-second", "b": "from-second"})
    auth = AuthService([first, second], Metrics(), ttl_s=10, negative_ttl_s=1)

    async def main() -> None:
        assert (await auth.authenticate(AccessToken("a"), "http")).name == "from-first"  # type: ignore[union-attr]
        assert (await auth.authenticate(AccessToken("b"), "http")).name == "from-second"  # type: ignore[union-attr]

    asyncio.run(main())


def test_invalidate_all_or_matching_and_bounded_size() -> None:
    auth, source, _, _ = make()

    async def main() -> None:
        await auth.authenticate(AccessToken("good"), "http")
        await auth.authenticate(AccessToken("bad"), "http")
        assert auth.invalidate(lambda cred, identity: identity is None) == 1
        assert auth.invalidate() == 1
        await auth.authenticate(AccessToken("good"), "http")
        assert source.lookups == 3

    asyncio.run(main())
    small = AuthService([TokenSource({})], Metrics(), ttl_s=10, negative_ttl_s=10, max_entries=10)

    async def flood() -> None:
        for n in range(1000):
            await small.authenticate(AccessToken(f"guess{n}"), "http")

    asyncio.run(flood())
    assert len(small._cache) + len(small._misses) <= 10


def test_a_flood_of_wrong_credentials_never_evicts_a_device() -> None:
    """Misses are kept apart, at most a tenth of AUTH_CACHE_MAX_ENTRIES: guessing clients churn only them
    (before, the oldest tenth of one shared cache went, which under a flood was the devices' own entries)."""
    source = TokenSource({f"T{n}": f"dev{n}" for n in range(10)})
    auth = AuthService([source], Metrics(), ttl_s=3600, negative_ttl_s=60, max_entries=20)

    async def main() -> None:
        for n in range(10):
            assert await auth.authenticate(AccessToken(f"T{n}"), "http") is not None
        for n in range(5000):
            assert await auth.authenticate(AccessToken(f"guess{n}"), "http") is None
        assert len(auth._misses) <= 2 and len(auth._cache) == 10
        for n in range(10):  # every device still from the cache: no new lookup
            assert await auth.authenticate(AccessToken(f"T{n}"), "http") is not None
        assert source.lookups == 10 + 5000
        # a credential's answer changes sides: a miss that is now known, a hit that is gone
        source.tokens["guess4999"] = "late"
        assert auth.invalidate(lambda credentials, identity: credentials == AccessToken("guess4999")) == 1
        assert (await auth.authenticate(AccessToken("guess4999"), "http")).name == "late"  # type: ignore[union-attr]
        del source.tokens["T0"]
        assert auth.invalidate(lambda credentials, identity: credentials == AccessToken("T0")) == 1
        assert await auth.authenticate(AccessToken("T0"), "http") is None
        assert AccessToken("T0") in auth._misses and AccessToken("T0") not in auth._cache
        assert auth.cached(AccessToken("T0"), "http") == (True, None)  # the cached refusal, counted

    asyncio.run(main())


def test_invalidate_source_keeps_what_other_sources_vouched_for() -> None:
    registry, backend = TokenSource({"reg": "r"}), TokenSource({"tb": "t"})
    registry.name, backend.name = "registry", "thingsboard"
    auth = AuthService([registry, backend], Metrics(), ttl_s=100, negative_ttl_s=100)

    async def main() -> None:
        for token in ("reg", "tb", "nobody"):
            await auth.authenticate(AccessToken(token), "http")
        assert auth.invalidate_source("registry") == 2  # the registry's hit and the miss
        for token in ("reg", "tb", "nobody"):
            await auth.authenticate(AccessToken(token), "http")

    asyncio.run(main())
    assert (registry.lookups, backend.lookups) == (5, 3)  # "tb" was still cached: no new query for it


def test_the_cache_bound_is_a_setting(tmp_path: Path) -> None:
    """AUTH_CACHE_MAX_ENTRIES reaches the gateway's auth cache (a flood of guesses cannot grow it past)."""
    gateway = Gateway(Settings(data_dir=tmp_path, auth_cache_max_entries=7, kafka_enabled=False))
    try:
        assert gateway.auth._max_entries == 7

        async def flood() -> None:
            for n in range(100):
                await gateway.auth.authenticate(AccessToken(f"guess{n}"), "http")

        asyncio.run(flood())
        assert len(gateway.auth._cache) == 0 and len(gateway.auth._misses) == 1  # misses: a tenth, at least one
    finally:
        gateway.registry.close()
        gateway.attributes.close()


def test_a_wrong_token_over_http_or_coap_is_logged_once_per_address(caplog: Any) -> None:
    """Counted before, but not logged: a device with a typo in its token left no trace in the log."""
    auth, _source, _clock, _metrics = make()

    async def main() -> None:
        for transport, address in (
            ("http", "10.0.0.1"),
            ("http", "10.0.0.1"),
            ("coap", "10.0.0.1"),
            ("http", "10.0.0.2"),
        ):
            assert await auth.authenticate(AccessToken("bad"), transport, address) is None
        assert await auth.authenticate(AccessToken("bad"), "mqtt", "10.0.0.3") is None  # MQTT logs its own line

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "refused unknown credentials" in r.getMessage()]
    assert lines == [
        "refused unknown credentials over http from 10.0.0.1",
        "refused unknown credentials over coap from 10.0.0.1",
        "refused unknown credentials over http from 10.0.0.2",
    ]


class Shared:
    """A SharedCache in a dict (what Redis holds for every instance)."""

    def __init__(self) -> None:
        self.entries: dict[Credentials, tuple[DeviceIdentity | None, str | None]] = {}
        self.bound: AuthService | None = None

    async def get(self, credentials: Credentials) -> tuple[bool, DeviceIdentity | None, str | None]:
        if credentials not in self.entries:
            return False, None, None
        return True, *self.entries[credentials]

    async def put(
        self, credentials: Credentials, identity: DeviceIdentity | None, source: str | None, ttl_s: float
    ) -> None:
        self.entries[credentials] = (identity, source)

    def bind(self, auth: AuthService) -> None:
        self.bound = auth


class Backend(TokenSource):
    name = "backend"
    remote = True  # shared by every instance, as ThingsBoard: one cached miss answers for it


def test_a_shared_miss_is_final_for_remote_sources_only() -> None:
    shared, registry, backend = Shared(), TokenSource({"local": "dev"}), Backend({})
    auth = AuthService([registry, backend], Metrics(), ttl_s=3600, negative_ttl_s=5, shared=shared)
    assert shared.bound is auth and is_remote(backend) and not is_remote(registry)
    shared.entries[AccessToken("local")] = (None, None)  # another instance, whose registry lacks it, missed
    shared.entries[AccessToken("guess")] = (None, None)

    async def scenario() -> None:
        device = await auth.authenticate(AccessToken("local"), "http")
        assert device is not None and device.name == "dev"  # this instance's registry knows it
        assert shared.entries[AccessToken("local")] == (device, "test")  # the hit replaces the shared miss
        assert await auth.authenticate(AccessToken("guess"), "http") is None
        assert (registry.lookups, backend.lookups) == (2, 0)  # the backend is never asked after a shared miss
        assert await auth.authenticate(AccessToken("new"), "http") is None  # nothing shared: everyone is asked
        assert (registry.lookups, backend.lookups) == (3, 1)

    asyncio.run(scenario())


def test_still_knows_asks_afresh() -> None:
    auth, source, _clock, _metrics = make()

    async def scenario() -> None:
        device = await auth.authenticate(AccessToken("good"), "mqtt")
        assert device is not None
        assert auth.credentials_by_device() == {device.id: [AccessToken("good")]}
        assert await auth.still_knows(device.id, [AccessToken("good")]) is True
        assert await auth.still_knows("someone-else", [AccessToken("good")]) is False
        del source.tokens["good"]
        assert await auth.still_knows(device.id, [AccessToken("other"), AccessToken("good")]) is False
        assert source.lookups == 5  # never the cache's answer

    asyncio.run(scenario())
