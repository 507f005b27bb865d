"""Per-device rate limits: ThingsBoard's "capacity:seconds[,...]" buckets, greedy refill, bounded memory, and
how DeviceApi applies them (refused before admission, counted, one log line per device per window)."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.attributes import AttributeStore
from tb_gateway.auth import AuthService
from tb_gateway.config import Settings, load_settings
from tb_gateway.device_api import DeviceApi
from tb_gateway.errors import ConfigError
from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import Pipeline
from tb_gateway.ratelimit import Bandwidth, DeviceLimiter, ceil_seconds, configured, format_limit, parse_limit
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import SEVERITY, Outcome
from tests.support import MemorySink, TokenSource

# --- the format ------------------------------------------------------------------------------------------


def test_parse_thingsboard_format() -> None:
    assert parse_limit("200:1,6000:60,14000:3600") == (Bandwidth(200, 1), Bandwidth(6000, 60), Bandwidth(14000, 3600))
    assert parse_limit(" 20 : 1 , 600:60 ") == (Bandwidth(20, 1), Bandwidth(600, 60))
    assert parse_limit("") == parse_limit("   ") == ()
    assert format_limit(parse_limit("20:1, 600:60")) == "20:1,600:60"
    assert format_limit(()) is None


@pytest.mark.parametrize(
    "bad", ["20", "20:", ":1", "a:1", "20:b", "0:1", "20:0", "-1:1", "1.5:1", "20:1,", "20:1:1", "20:1;600:60", ","]
)
def test_parse_refuses_malformed_limits(bad: str) -> None:
    with pytest.raises(ValueError, match="capacity:seconds"):
        parse_limit(bad)


def test_bad_limit_stops_start_up_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, rate_limit_device_telemetry_data_points="100:1,x")
    assert caught.value.problems[0].startswith("RATE_LIMIT_DEVICE_TELEMETRY_DATA_POINTS: ")


def test_settings_select_the_limits() -> None:
    def limiter(**kw: object) -> DeviceLimiter | None:
        return configured(Settings(_env_file=None, **kw))  # type: ignore[call-arg]

    assert limiter() is None  # off by default, as in the seed
    assert limiter(rate_limit_device_messages="1:1") is None  # RATE_LIMIT_ENABLED is the master switch
    seed = limiter(rate_limit_enabled=True)
    assert seed is not None and seed.limits == ((Bandwidth(100, 1),), (), ())
    assert limiter(rate_limit_enabled=True, rate_limit_requests_per_second=7).limits[0] == (Bandwidth(7, 1),)  # type: ignore[union-attr]
    full = limiter(
        rate_limit_enabled=True,
        rate_limit_device_messages="20:1,600:60",
        rate_limit_device_telemetry_messages="10:1",
        rate_limit_device_telemetry_data_points="100:1",
    )
    assert full is not None
    assert [format_limit(limit) for limit in full.limits] == ["20:1,600:60", "10:1", "100:1"]


# --- the buckets -----------------------------------------------------------------------------------------


def test_burst_then_greedy_refill() -> None:
    limiter = DeviceLimiter(parse_limit("20:1"))
    assert all(limiter.try_acquire("d", 0.0) is None for _ in range(20))
    refused = limiter.try_acquire("d", 0.0)
    assert refused is not None and refused.limit == "messages" and refused.spec == "20:1"
    assert refused.retry_after_s == pytest.approx(0.05)
    # greedy: one token is back after 1/20 s, not only after the whole second
    assert limiter.try_acquire("d", 0.049) is not None
    assert limiter.try_acquire("d", 0.05) is None
    assert limiter.try_acquire("d", 0.05) is not None
    # a long pause refills to capacity, never beyond
    assert sum(limiter.try_acquire("d", 100.0) is None for _ in range(30)) == 20


def test_every_bucket_is_enforced_at_once() -> None:
    limiter = DeviceLimiter(parse_limit("2:1,3:10"))
    assert [limiter.try_acquire("d", 0.0) is None for _ in range(3)] == [True, True, False]
    # one second later the first bucket is full again, but the second had 1 left plus 0.3 refilled
    assert [limiter.try_acquire("d", 1.0) is None for _ in range(2)] == [True, False]
    refused = limiter.try_acquire("d", 1.0)
    assert refused is not None and refused.spec == "2:1,3:10"
    assert refused.retry_after_s == pytest.approx((1 - 0.3) / 0.3)  # the slow bucket decides


def test_devices_are_limited_independently() -> None:
    limiter = DeviceLimiter(parse_limit("1:60"))
    assert limiter.try_acquire("a", 0.0) is None
    assert limiter.try_acquire("a", 1.0) is not None
    assert limiter.try_acquire("b", 1.0) is None


def test_telemetry_limits_and_data_points() -> None:
    limiter = DeviceLimiter((), parse_limit("3:1"), parse_limit("10:1"))
    assert limiter.try_acquire("d", 0.0, data_points=8) is None
    too_many = limiter.try_acquire("d", 0.0, data_points=5)
    assert too_many is not None and too_many.limit == "telemetry_data_points"
    assert too_many.retry_after_s == pytest.approx(0.3)
    # the refused message took nothing: 2 points still fit, and telemetry messages still have 2 tokens
    assert limiter.try_acquire("d", 0.0, data_points=2) is None
    # attributes, claims: not telemetry, so only the messages limit (none here) applies
    assert all(limiter.try_acquire("d", 0.0) is None for _ in range(50))
    assert limiter.try_acquire("d", 0.0, data_points=0) is None  # third telemetry message
    over = limiter.try_acquire("d", 0.0, data_points=0)
    assert over is not None and over.limit == "telemetry_messages"


def test_a_message_larger_than_a_bucket_never_passes() -> None:
    limiter = DeviceLimiter((), (), parse_limit("10:1,100:60"))
    refused = limiter.try_acquire("d", 0.0, data_points=11)
    assert refused is not None and refused.retry_after_s == math.inf and not refused.passable  # no wait helps
    assert limiter.try_acquire("d", 1000.0, data_points=11) is not None
    assert limiter.try_acquire("d", 1000.0, data_points=10) is None
    short = limiter.try_acquire("d", 1000.0, data_points=10)  # within capacity: it only has to wait
    assert short is not None and short.passable and short.retry_after_s == pytest.approx(1.0)


def test_retry_after_is_the_wait_for_the_refused_message_itself() -> None:
    limiter = DeviceLimiter((), (), parse_limit("10:10"))  # one data point per second
    assert limiter.try_acquire("d", 0.0, data_points=10) is None
    refused = limiter.try_acquire("d", 0.0, data_points=10)
    assert refused is not None and refused.retry_after_s == pytest.approx(10.0)  # ten points: ten seconds
    assert limiter.try_acquire("d", refused.retry_after_s - 0.01, data_points=10) is not None
    assert limiter.try_acquire("d", refused.retry_after_s, data_points=10) is None


def test_first_short_limit_is_named_slowest_decides_the_wait() -> None:
    limiter = DeviceLimiter(parse_limit("1:1"), (), parse_limit("1:100"))
    assert limiter.try_acquire("d", 0.0, data_points=1) is None
    refused = limiter.try_acquire("d", 0.0, data_points=1)
    assert refused is not None and refused.limit == "messages"
    assert refused.retry_after_s == pytest.approx(100.0)


def test_clock_going_backwards_adds_nothing() -> None:
    limiter = DeviceLimiter(parse_limit("1:10"))
    assert limiter.try_acquire("d", 100.0) is None
    assert limiter.try_acquire("d", 50.0) is not None
    assert limiter.try_acquire("d", 105.0) is not None  # still measured from 100
    assert limiter.try_acquire("d", 110.0) is None


def test_wait_s_for_retry_after() -> None:
    limiter = DeviceLimiter(parse_limit("2:1"))
    assert limiter.wait_s("d", 0.0) == 0.0
    limiter.try_acquire("d", 0.0)
    assert limiter.wait_s("d", 0.0) == 0.0  # one token left
    limiter.try_acquire("d", 0.0)
    assert limiter.wait_s("d", 0.0) == pytest.approx(0.5)
    assert limiter.wait_s("d", 0.2) == pytest.approx(0.3)
    assert (ceil_seconds(0.3), ceil_seconds(0.0), ceil_seconds(1.0), ceil_seconds(1.01)) == (1, 1, 1, 2)


def test_idle_devices_are_forgotten() -> None:
    limiter = DeviceLimiter(parse_limit("5:1,50:30"))
    for i in range(1000):
        limiter.try_acquire(f"dev{i}", i * 0.01)
    assert len(limiter) == 1000  # all within the last 30 s
    for t in range(40, 80):
        limiter.try_acquire("busy", float(t))
    assert len(limiter) == 1  # everyone else idle for >= 30 s: their buckets are full again
    assert len(DeviceLimiter()) == 0


def test_hard_cap_on_remembered_devices() -> None:
    limiter = DeviceLimiter(parse_limit("1:3600"), max_devices=100)
    for i in range(1000):
        limiter.try_acquire(f"dev{i}", 0.0)
    assert len(limiter) == 100
    assert limiter.try_acquire("dev999", 0.0) is not None  # recent ones are still limited


class Reference:
    """The textbook model: every device's buckets kept forever, refilled continuously."""

    def __init__(self, limits: tuple[tuple[Bandwidth, ...], ...]) -> None:
        self.limits = limits
        self.state: dict[str, tuple[float, list[list[float]]]] = {}

    def try_acquire(self, key: str, now: float, points: int | None) -> bool:
        last, tokens = self.state.get(key, (now, [[float(b.capacity) for b in limit] for limit in self.limits]))
        elapsed = max(0.0, now - last)
        for limit, row in zip(self.limits, tokens, strict=True):
            for i, b in enumerate(limit):
                row[i] = min(b.capacity, row[i] + elapsed * b.rate)
        needs = (1, 1 if points is not None else 0, points or 0)
        ok = all(not need or t >= need for need, row in zip(needs, tokens, strict=True) for t in row)
        if ok:
            for need, row in zip(needs, tokens, strict=True):
                row[:] = [t - need for t in row]
        self.state[key] = (max(now, last), tokens)
        return ok


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.floats(0, 3, allow_nan=False),
            st.none() | st.integers(0, 6),
        ),
        max_size=120,
    )
)
def test_eviction_never_changes_an_answer(steps: list[tuple[str, float, int | None]]) -> None:
    limits = (parse_limit("3:1,5:4"), parse_limit("2:2"), parse_limit("8:1"))
    limiter, reference = DeviceLimiter(*limits), Reference(limits)
    now = 0.0
    for key, dt, points in steps:
        now += dt
        assert (limiter.try_acquire(key, now, points) is None) == reference.try_acquire(key, now, points)


# --- DeviceApi -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_api(tmp_path: Path, sink: MemorySink, clock: Clock, **overrides: object) -> DeviceApi:
    config = Settings(_env_file=None, kafka_enabled=False, data_dir=tmp_path, rate_limit_enabled=True, **overrides)  # type: ignore[arg-type]
    metrics = Metrics()
    pipeline = Pipeline(sink, metrics, batch_size=10, batch_timeout_s=0.01, max_queue=1000)
    auth = AuthService([TokenSource({"T1": "dev1"})], metrics, ttl_s=60, negative_ttl_s=5)
    return DeviceApi(config, auth, pipeline, AttributeStore(tmp_path / "a.db"), metrics, clock_s=clock)


def sample(api: DeviceApi, name: str, labels: dict[str, str]) -> float:
    return api.metrics.registry.get_sample_value(name, labels) or 0.0


def test_device_api_refuses_over_limit_before_admission(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink, clock = MemorySink(), Clock()
    api = limited_api(
        tmp_path,
        sink,
        clock,
        rate_limit_device_messages="3:60",
        rate_limit_device_telemetry_data_points="5:60",
    )
    dev = DeviceIdentity("id-1", "dev1")
    other = DeviceIdentity("id-2", "dev2")

    async def scenario() -> list[Outcome]:
        runner = asyncio.create_task(api.pipeline.run())
        answers: list[Outcome] = []
        for payload in (b'{"a":1,"b":2}', b'{"a":1,"b":2,"c":3}', b'{"a":1}', b"{}", b'{"x":1}', b'{"x":1}'):
            answer = api.post(dev, RecordKind.TELEMETRY, payload, Transport.HTTP)
            answers.append(answer if isinstance(answer, Outcome) else await answer)
        answers.append(await api.post(other, RecordKind.ATTRIBUTES, b'{"k":1}', Transport.COAP))  # type: ignore[misc]
        api.pipeline.close()
        await runner
        return answers

    with caplog.at_level(logging.WARNING, logger="tb_gateway.device_api"):
        answers = asyncio.run(scenario())
    D, R = Outcome.DELIVERED, Outcome.RATE_LIMITED
    # 2 points, then 3 (total 5 of 5), then a 6th point is refused, "{}" is a message of 0 points (the third),
    # then the messages limit (3 per minute) refuses the rest; another device is not affected
    assert answers == [D, D, R, D, R, R, D]
    assert [r.values for r in sink.records] == [{"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}, {"k": 1}]
    assert sample(api, "tb_gateway_rate_limited_total", {"transport": "http", "limit": "telemetry_data_points"}) == 1
    assert sample(api, "tb_gateway_rate_limited_total", {"transport": "http", "limit": "messages"}) == 2
    assert sample(api, "tb_gateway_refusals_total", {"transport": "http", "reason": "rate_limited"}) == 3
    assert sample(api, "tb_gateway_queue_depth", {}) == 0
    lines = [r.getMessage() for r in caplog.records if "rate_limited" in r.getMessage()]
    assert len(lines) == 1 and "dev1" in lines[0] and "telemetry_data_points limit 5:60" in lines[0]
    assert api.rate_limit_wait_s(dev) == pytest.approx(20.0)  # 3 per 60 s: one token per 20 s
    assert api.rate_limit_wait_s(other) == 0.0


def test_device_api_wait_is_for_the_refused_message(tmp_path: Path) -> None:
    """Retry-After / Max-Age: the refused message passes after the wait (not a one-point message); a message
    that can never pass says so (``math.inf``: the transports answer 413 / 4.13)."""
    sink, clock = MemorySink(), Clock()
    api = limited_api(tmp_path, sink, clock, rate_limit_device_telemetry_data_points="10:10")
    dev, fresh = DeviceIdentity("id-1", "dev1"), DeviceIdentity("id-2", "dev2")
    ten = b'{"k0":0,"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k8":8,"k9":9}'

    async def scenario() -> None:
        runner = asyncio.create_task(api.pipeline.run())
        assert await api.post(dev, RecordKind.TELEMETRY, ten, Transport.HTTP) is Outcome.DELIVERED  # type: ignore[misc]
        assert api.post(dev, RecordKind.TELEMETRY, ten, Transport.HTTP) is Outcome.RATE_LIMITED
        assert api.rate_limit_wait_s(dev) == pytest.approx(10.0)  # ten points at one per second
        clock.now += 4.0
        assert api.rate_limit_wait_s(dev) == pytest.approx(6.0)  # asked later: what is left of it
        clock.now += 6.0
        assert await api.post(dev, RecordKind.TELEMETRY, ten, Transport.HTTP) is Outcome.DELIVERED  # type: ignore[misc]
        eleven = ten[:-1] + b',"k10":10}'
        assert api.post(fresh, RecordKind.TELEMETRY, eleven, Transport.COAP) is Outcome.RATE_LIMITED
        assert api.rate_limit_wait_s(fresh) == math.inf
        api.pipeline.close()
        await runner

    asyncio.run(scenario())


def test_device_api_session_limits_report_the_configuration(tmp_path: Path) -> None:
    clock = Clock()
    api = limited_api(
        tmp_path,
        MemorySink(),
        clock,
        rate_limit_device_telemetry_messages="10:1,300:60",
        rate_limit_device_telemetry_data_points="200:1",
    )
    assert api.session_limits() == {
        "maxPayloadSize": 65536,
        "maxInflightMessages": 100,
        "rateLimits": {"messages": "100:1", "telemetryMessages": "10:1,300:60", "telemetryDataPoints": "200:1"},
    }
    off = DeviceApi(
        Settings(_env_file=None, data_dir=tmp_path),  # type: ignore[call-arg]
        api.auth,
        api.pipeline,
        api.attributes,
        api.metrics,
    )
    assert off.limiter is None and off.rate_limit_wait_s(DeviceIdentity("x", "x")) == 0.0
    nothing = {"messages": None, "telemetryMessages": None, "telemetryDataPoints": None}
    assert off.session_limits()["rateLimits"] == nothing


def test_rate_limited_ranks_below_permanent_refusals() -> None:
    assert SEVERITY[Outcome.DELIVERED] < SEVERITY[Outcome.RATE_LIMITED] < SEVERITY[Outcome.REJECTED]
    assert not Outcome.RATE_LIMITED.delivered
