"""Token validation against the ThingsBoard stand-in, alone and behind the AuthService cache."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tb_gateway.auth import AccessToken, AuthService, CredentialSource, MqttBasic, X509Fingerprint
from tb_gateway.auth_thingsboard import ThingsBoardCredentialSource, forget_token
from tb_gateway.errors import CredentialsUnavailable
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.thingsboard import ThingsBoardSink
from tests.tb_standin import ThingsBoardStandIn

GOOD = "A1_TEST_TOKEN"


@pytest.fixture
def standin() -> Iterator[ThingsBoardStandIn]:
    with ThingsBoardStandIn((GOOD,)) as server:
        yield server


def checks(server: ThingsBoardStandIn) -> int:
    return sum(1 for a in server.answered if a.method == "GET")


def run(source: Any, body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await source.start()
        try:
            return await body()
        finally:
            await source.close()

    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FixedSource:
    """A stand-in for the embedded registry in front of ThingsBoard."""

    name = "fixed"

    def __init__(self, token: str, identity: DeviceIdentity) -> None:
        self.token, self.identity = token, identity

    async def lookup(self, credentials: Any) -> DeviceIdentity | None:
        return self.identity if credentials == AccessToken(self.token) else None


def make(server: ThingsBoardStandIn, timeout_s: float = 2.0) -> tuple[ThingsBoardCredentialSource, Metrics]:
    metrics = Metrics()
    return ThingsBoardCredentialSource(server.base_url, metrics, timeout_s=timeout_s), metrics


def auth_failures(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tb_gateway_auth_failures_total", {"transport": "http"}) or 0.0


# --- the source alone ---


def test_valid_token_gives_a_stable_identity_that_hides_the_token(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    identity = run(source, lambda: source.lookup(AccessToken(GOOD)))
    expected_id = "tb:" + hashlib.sha256(GOOD.encode()).hexdigest()[:16]
    assert identity == DeviceIdentity(id=expected_id, name=expected_id, token=GOOD)
    assert GOOD not in identity.id and GOOD not in identity.name and GOOD not in repr(identity)
    assert standin.answered[0].path == f"/api/v1/{GOOD}/attributes"
    again = run(source, lambda: source.lookup(AccessToken(GOOD)))
    assert again == identity  # same id on every lookup, in any process
    other = run(source, lambda: source.lookup(AccessToken(GOOD + "x")))
    assert other is None
    sample = metrics.registry.get_sample_value(
        "tb_gateway_thingsboard_requests_total", {"endpoint": "auth", "result": "200"}
    )
    assert sample == 2


def test_unknown_token_is_none(standin: ThingsBoardStandIn) -> None:
    source, _ = make(standin)
    assert run(source, lambda: source.lookup(AccessToken("NOPE"))) is None
    assert [a.status for a in standin.answered] == [401]


def test_token_is_sent_as_one_escaped_segment(standin: ThingsBoardStandIn) -> None:
    odd = "a/b?c#d e%2F"
    standin.add_token(odd)
    source, _ = make(standin)
    assert run(source, lambda: source.lookup(AccessToken(odd))) is not None
    assert run(source, lambda: source.lookup(AccessToken("a"))) is None  # not the prefix before the slash


@pytest.mark.parametrize(
    "credentials",
    [AccessToken(""), AccessToken("x" * 257), MqttBasic("c", "u", "p"), X509Fingerprint("ab" * 32)],
)
def test_what_it_cannot_judge_is_none_without_asking(standin: ThingsBoardStandIn, credentials: Any) -> None:
    source, _ = make(standin)
    assert run(source, lambda: source.lookup(credentials)) is None
    assert standin.answered == []


def test_backend_down_is_unavailable_not_invalid(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    standin.go_down("refuse")
    with pytest.raises(CredentialsUnavailable, match="unreachable"):
        run(source, lambda: source.lookup(AccessToken(GOOD)))
    sample = metrics.registry.get_sample_value(
        "tb_gateway_thingsboard_requests_total", {"endpoint": "auth", "result": "error"}
    )
    assert sample == 1


@pytest.mark.parametrize("status", [500, 503, 429, 408, 403, 404, 302])
def test_any_other_answer_is_unavailable(standin: ThingsBoardStandIn, status: int) -> None:
    source, _ = make(standin)
    standin.fail_next(status)
    with pytest.raises(CredentialsUnavailable, match=f"HTTP {status}"):
        run(source, lambda: source.lookup(AccessToken(GOOD)))


def test_slow_backend_is_unavailable(standin: ThingsBoardStandIn) -> None:
    source, _ = make(standin, timeout_s=0.2)
    standin.delay_s = 0.6
    with pytest.raises(CredentialsUnavailable):
        run(source, lambda: source.lookup(AccessToken(GOOD)))


# --- behind the AuthService ---


def service(source: CredentialSource, metrics: Metrics, clock: Clock, *extra: CredentialSource) -> AuthService:
    return AuthService([*extra, source], metrics, ttl_s=3600.0, negative_ttl_s=5.0, clock=clock)


def test_valid_token_is_asked_once_per_hour(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    clock = Clock()
    auth = service(source, metrics, clock)

    async def body() -> None:
        first = await auth.authenticate(AccessToken(GOOD), "http")
        clock.now += 3599
        assert await auth.authenticate(AccessToken(GOOD), "http") == first
        assert checks(standin) == 1  # the second lookup did not reach the backend
        clock.now += 2
        assert await auth.authenticate(AccessToken(GOOD), "http") == first
        assert checks(standin) == 2  # the hour is over: asked again

    run(source, body)
    assert auth_failures(metrics) == 0


def test_invalid_token_is_cached_only_for_the_negative_ttl(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    clock = Clock()
    auth = service(source, metrics, clock)

    async def body() -> None:
        assert await auth.authenticate(AccessToken("NEW"), "http") is None
        clock.now += 4
        assert await auth.authenticate(AccessToken("NEW"), "http") is None
        assert checks(standin) == 1
        standin.add_token("NEW")  # registered in ThingsBoard meanwhile
        clock.now += 2
        assert await auth.authenticate(AccessToken("NEW"), "http") is not None
        assert checks(standin) == 2

    run(source, body)
    assert auth_failures(metrics) == 2


def test_unavailable_is_not_cached_and_not_counted_as_a_bad_token(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    auth = service(source, metrics, Clock())

    async def body() -> None:
        standin.go_down("503")
        with pytest.raises(CredentialsUnavailable):
            await auth.authenticate(AccessToken(GOOD), "http")
        standin.come_back()
        assert await auth.authenticate(AccessToken(GOOD), "http") is not None  # asked again at once

    run(source, body)
    assert [a.status for a in standin.answered] == [503, 200]
    assert auth_failures(metrics) == 0


def test_concurrent_lookups_share_one_request(standin: ThingsBoardStandIn) -> None:
    source, metrics = make(standin)
    auth = service(source, metrics, Clock())
    standin.delay_s = 0.2

    async def body() -> list[Any]:
        return await asyncio.gather(*(auth.authenticate(AccessToken(GOOD), "http") for _ in range(20)))

    identities = run(source, body)
    assert len(set(identities)) == 1 and identities[0] is not None
    assert checks(standin) == 1


def test_a_source_in_front_answers_first(standin: ThingsBoardStandIn) -> None:
    local = DeviceIdentity(id="reg-1", name="boiler", token="LOCAL")
    source, metrics = make(standin)
    auth = service(source, metrics, Clock(), FixedSource("LOCAL", local))
    assert run(source, lambda: auth.authenticate(AccessToken("LOCAL"), "http")) == local
    assert standin.answered == []


def test_token_revoked_in_thingsboard_is_dropped_from_the_cache_by_the_sink(
    standin: ThingsBoardStandIn,
) -> None:
    """The sink's 401 hook invalidates the hour-long cache entry: the next request is checked afresh."""
    source, metrics = make(standin)
    auth = service(source, metrics, Clock())
    sink = ThingsBoardSink(
        standin.base_url, metrics, timeout_s=2.0, on_token_rejected=lambda token: forget_token(auth, token)
    )

    async def body() -> None:
        await sink.start()
        try:
            identity = await auth.authenticate(AccessToken(GOOD), "http")
            assert identity is not None
            record = Record(identity, RecordKind.TELEMETRY, 1, {"t": 1}, Transport.HTTP, 1)
            assert list(await sink.deliver([record])) == [Outcome.DELIVERED]
            standin.remove_token(GOOD)
            assert list(await sink.deliver([record])) == [Outcome.REJECTED]
            assert await auth.authenticate(AccessToken(GOOD), "http") is None
        finally:
            await sink.close()

    run(source, body)
    assert checks(standin) == 2
