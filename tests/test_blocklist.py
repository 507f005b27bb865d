"""Brute-force protection: the sans-IO blocklist, and AuthService applying it for every transport."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tb_gateway.auth import AccessToken, AuthService, MqttBasic
from tb_gateway.blocklist import Blocklist, configured
from tb_gateway.config import Settings
from tb_gateway.errors import AddressBlocked
from tb_gateway.metrics import Metrics
from tests.support import TokenSource


def test_off_by_default_as_in_thingsboard() -> None:
    assert configured(Settings(_env_file=None)) is None  # type: ignore[call-arg]
    on = configured(Settings(_env_file=None, ip_block_enabled=True))  # type: ignore[call-arg]
    assert on is not None and (on.max_failures, on.block_s) == (10, 60.0)


def test_ten_failures_block_for_sixty_seconds() -> None:
    blocklist = Blocklist()
    assert [blocklist.failed("10.0.0.1", float(t)) for t in range(10)] == [False] * 9 + [True]
    assert blocklist.blocked_for("10.0.0.1", 9.0) == 60.0
    assert blocklist.blocked_for("10.0.0.1", 50.0) == 19.0
    assert blocklist.blocked_for("10.0.0.2", 50.0) == 0.0  # only that address
    assert blocklist.blocked_for("10.0.0.1", 69.0) == 0.0
    # after the block a fresh allowance: one more failure does not block again
    assert blocklist.failed("10.0.0.1", 70.0) is False
    assert blocklist.blocked_for("10.0.0.1", 70.0) == 0.0


def test_success_clears_the_count() -> None:
    blocklist = Blocklist(max_failures=3, block_s=60.0)
    blocklist.failed("a", 0.0)
    blocklist.failed("a", 1.0)
    blocklist.succeeded("a")
    assert len(blocklist) == 0
    assert blocklist.failed("a", 2.0) is False
    assert blocklist.failed("a", 3.0) is False
    assert blocklist.failed("a", 4.0) is True
    blocklist.succeeded("a")  # cannot lift a block in force
    assert blocklist.blocked_for("a", 5.0) == pytest.approx(59.0)


def test_failures_further_apart_than_the_block_do_not_add_up() -> None:
    blocklist = Blocklist(max_failures=3, block_s=60.0)
    assert not any(blocklist.failed("a", t * 61.0) for t in range(20))  # a typo retried once a minute
    assert [blocklist.failed("a", 20 * 61.0 + t) for t in range(3)] == [False, False, True]


def test_memory_is_bounded() -> None:
    blocklist = Blocklist(max_failures=5, block_s=10.0, max_addresses=1000)
    for i in range(50_000):
        blocklist.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", i * 0.0001)
    assert len(blocklist) == 1000  # the cap under a flood of distinct addresses
    blocklist.failed("late", 100.0)
    assert len(blocklist) == 1  # the rest expired


# --- through AuthService: what every transport gets ----------------------------------------------------------


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def service(source: TokenSource, clock: Clock, metrics: Metrics) -> AuthService:
    blocklist = Blocklist(max_failures=3, block_s=30.0)
    return AuthService([source], metrics, ttl_s=60, negative_ttl_s=5, clock=clock, blocklist=blocklist)


def value(metrics: Metrics, name: str, transport: str) -> float:
    return metrics.registry.get_sample_value(name, {"transport": transport}) or 0.0


def test_auth_service_blocks_an_address_after_wrong_credentials(caplog: pytest.LogCaptureFixture) -> None:
    source, clock, metrics = TokenSource({"good": "dev1"}), Clock(), Metrics()
    auth = service(source, clock, metrics)

    async def scenario() -> None:
        for guess in ("g1", "g2"):
            assert await auth.authenticate(AccessToken(guess), "http", "192.0.2.7") is None
        assert await auth.authenticate(AccessToken("g3"), "http", "192.0.2.9") is None  # another address
        assert await auth.authenticate(AccessToken("good"), "http", "192.0.2.7") is not None  # clears the count
        for guess in ("g4", "g5", "g6"):
            assert await auth.authenticate(AccessToken(guess), "coap", "192.0.2.7") is None
        asked = source.lookups
        with pytest.raises(AddressBlocked) as blocked:
            await auth.authenticate(AccessToken("good"), "mqtt", "192.0.2.7")
        assert blocked.value.retry_after_s == 30.0 and blocked.value.address == "192.0.2.7"
        with pytest.raises(AddressBlocked):
            auth.cached(AccessToken("good"), "http", "192.0.2.7")
        assert source.lookups == asked  # nothing looked up for a blocked address
        assert await auth.authenticate(AccessToken("good"), "mqtt") is not None  # no address: not checked
        clock.now += 30.0
        assert await auth.authenticate(AccessToken("good"), "mqtt", "192.0.2.7") is not None

    with caplog.at_level(logging.WARNING, logger="tb_gateway.auth"):
        asyncio.run(scenario())
    assert value(metrics, "tb_gateway_auth_blocked_total", "mqtt") == 1
    assert value(metrics, "tb_gateway_auth_blocked_total", "http") == 1
    assert value(metrics, "tb_gateway_auth_failures_total", "coap") == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [  # each transport's first wrong token per address (once a minute), then the block
        "refused unknown credentials over http from 192.0.2.7",
        "refused unknown credentials over http from 192.0.2.9",
        "refused unknown credentials over coap from 192.0.2.7",
        "address 192.0.2.7 blocked for 30 s after 3 wrong credentials",
    ]


def test_cached_answers_count_for_and_against_the_address() -> None:
    source, clock, metrics = TokenSource({"good": "dev1"}), Clock(), Metrics()
    auth = service(source, clock, metrics)

    async def scenario() -> None:
        await auth.authenticate(AccessToken("bad"), "http", "198.51.100.1")  # 1 failure, now a cached miss
        assert auth.cached(AccessToken("bad"), "http", "198.51.100.1") == (True, None)  # 2
        assert auth.cached(AccessToken("unknown"), "http", "198.51.100.1") == (False, None)  # not decided: no count
        assert auth.cached(AccessToken("bad"), "http", "198.51.100.1") == (True, None)  # 3 -> blocked
        with pytest.raises(AddressBlocked):
            auth.cached(AccessToken("bad"), "http", "198.51.100.1")

    asyncio.run(scenario())
    assert value(metrics, "tb_gateway_auth_failures_total", "http") == 3


def test_mqtt_fallback_is_one_attempt() -> None:
    """MQTT tries the user name as a token, then basic credentials: a miss on the first is not a failure."""
    source, clock, metrics = TokenSource({}), Clock(), Metrics()
    auth = service(source, clock, metrics)
    basic = MqttBasic("c1", "user", "pw")

    async def scenario() -> None:
        for _ in range(2):
            assert await auth.authenticate(AccessToken("user"), "mqtt", "203.0.113.5", fallback=basic) is None
        assert source.lookups == 2  # both forms asked once, then answered from the cache

    asyncio.run(scenario())
    assert value(metrics, "tb_gateway_auth_failures_total", "mqtt") == 2  # one per CONNECT, not per form
