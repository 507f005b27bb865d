"""The ThingsBoard HTTP sink against the stand-in server: combining, retries, outages, permanent refusals."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tb_gateway.errors import RetriableSinkError
from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import Pipeline
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.reliable import SpoolingSink
from tb_gateway.sinks.spool import Spool
from tb_gateway.sinks.thingsboard import ThingsBoardSink, plan_requests
from tests.tb_standin import ThingsBoardStandIn

A = DeviceIdentity(id="dev-a", name="a", token="TOKEN_A")
B = DeviceIdentity(id="dev-b", name="b", token="TOKEN_B")


def rec(device: DeviceIdentity, kind: RecordKind, ts: int, **values: Any) -> Record:
    return Record(device, kind, ts, values, Transport.HTTP, ts)


def tel(device: DeviceIdentity, ts: int, **values: Any) -> Record:
    return rec(device, RecordKind.TELEMETRY, ts, **values)


def attr(device: DeviceIdentity, ts: int, **values: Any) -> Record:
    return rec(device, RecordKind.ATTRIBUTES, ts, **values)


@pytest.fixture
def standin() -> Iterator[ThingsBoardStandIn]:
    with ThingsBoardStandIn((A.token, B.token)) as server:
        yield server


class Sleeps:
    """Records the backoff delays instead of waiting them out (the test stays fast and exact)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def make_sink(server: ThingsBoardStandIn, **kwargs: Any) -> tuple[ThingsBoardSink, Sleeps, Metrics]:
    sleeps = Sleeps()
    metrics = Metrics()
    options: dict[str, Any] = {"timeout_s": 2.0, "sleep": sleeps, "rng": random.Random(7)}
    options.update(kwargs)
    return ThingsBoardSink(server.base_url, metrics, **options), sleeps, metrics


def run_with(sink: ThingsBoardSink, body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await sink.start()
        try:
            return await body()
        finally:
            await sink.close()

    return asyncio.run(main())


def last_copies(values: list[int]) -> list[int]:
    """The sequence as the backend ends up seeing it: a duplicate's last copy is the one that counts."""
    seen: set[int] = set()
    kept = [v for v in reversed(values) if not (v in seen or seen.add(v))]
    return kept[::-1]


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def requests_count(metrics: Metrics, endpoint: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "tb_gateway_thingsboard_requests_total", {"endpoint": endpoint, "result": result}
    )
    return value or 0.0


# --- planning (pure) ---


def test_plan_combines_each_devices_records_in_first_appearance_order() -> None:
    claim = rec(B, RecordKind.CLAIM, 5, secretKey="s", durationMs=1000)
    batch = [
        tel(A, 1, t=1),
        attr(B, 2, fw="1.0", mode="x"),
        tel(B, 3, t=2),
        tel(A, 4, t=3, h=9),
        claim,
        attr(B, 6, fw="1.1"),
        attr(A, 7, on=True),
        rec(B, RecordKind.CLAIM, 8),
    ]
    plans = plan_requests(batch)
    assert [[(r.token, r.endpoint) for r in device] for device in plans] == [
        [("TOKEN_A", "telemetry"), ("TOKEN_A", "attributes")],
        [("TOKEN_B", "attributes"), ("TOKEN_B", "telemetry"), ("TOKEN_B", "claim"), ("TOKEN_B", "claim")],
    ]
    a_tel, a_attr = plans[0]
    assert a_tel.body == [{"ts": 1, "values": {"t": 1}}, {"ts": 4, "values": {"t": 3, "h": 9}}]
    assert a_tel.indexes == (0, 3)
    assert a_attr.body == {"on": True} and a_attr.indexes == (6,)
    b_attr, b_tel, b_claim1, b_claim2 = plans[1]
    assert b_attr.body == {"fw": "1.1", "mode": "x"}  # later value wins, earlier keys kept
    assert b_attr.indexes == (1, 5)
    assert b_tel.body == [{"ts": 3, "values": {"t": 2}}]
    assert (b_claim1.body, b_claim1.indexes) == ({"secretKey": "s", "durationMs": 1000}, (4,))
    assert (b_claim2.body, b_claim2.indexes) == ({}, (7,))
    assert all(r.device in {"a", "b"} for device in plans for r in device)  # logs name devices, not tokens


def test_plan_of_an_empty_batch_is_empty() -> None:
    assert plan_requests([]) == []


# --- delivery against the stand-in ---


def test_one_request_per_device_and_kind_reaches_the_backend(standin: ThingsBoardStandIn) -> None:
    sink, _, metrics = make_sink(standin)
    batch = [
        tel(A, 1, t=1),
        tel(B, 2, t=10),
        tel(A, 3, t=2),
        attr(A, 4, x=1),
        attr(A, 5, x=2, y=3),
        tel(B, 6, t=11),
    ]
    outcomes = run_with(sink, lambda: sink.deliver(batch))
    assert list(outcomes) == [Outcome.DELIVERED] * 6
    posts = sorted((r.token, r.endpoint) for r in standin.received)
    assert posts == [("TOKEN_A", "attributes"), ("TOKEN_A", "telemetry"), ("TOKEN_B", "telemetry")]
    assert standin.telemetry("TOKEN_A") == [{"ts": 1, "values": {"t": 1}}, {"ts": 3, "values": {"t": 2}}]
    assert standin.telemetry("TOKEN_B") == [{"ts": 2, "values": {"t": 10}}, {"ts": 6, "values": {"t": 11}}]
    assert standin.client_attributes("TOKEN_A") == {"x": 2, "y": 3}
    assert requests_count(metrics, "telemetry", "200") == 2
    assert sink.health()["status"] == "up"


def test_batches_reuse_keep_alive_connections_and_keep_device_order(standin: ThingsBoardStandIn) -> None:
    sink, _, _ = make_sink(standin, max_connections=2)

    async def body() -> None:
        for n in range(20):
            outcomes = await sink.deliver([tel(A, n, n=n), tel(B, n, n=n)])
            assert list(outcomes) == [Outcome.DELIVERED] * 2

    run_with(sink, body)
    assert [e["values"]["n"] for e in standin.telemetry("TOKEN_A")] == list(range(20))
    assert standin.connections_accepted <= 2  # 40 requests over at most max_connections connections


def test_transient_5xx_and_408_are_retried_with_growing_backoff(standin: ThingsBoardStandIn) -> None:
    sink, sleeps, metrics = make_sink(standin, max_retries=3, retry_backoff_ms=100, retry_backoff_max_ms=10_000)
    standin.fail_next(500, 1)
    standin.fail_next(502, 1)
    standin.fail_next(408, 1)
    outcomes = run_with(sink, lambda: sink.deliver([tel(A, 1, t=1)]))
    assert list(outcomes) == [Outcome.DELIVERED]
    assert [a.status for a in standin.answered] == [500, 502, 408, 200]
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays, start=1):  # half fixed, half jitter: [d/2, d]
        nominal = 0.1 * 2 ** (attempt - 1)
        assert nominal / 2 <= delay <= nominal
    assert standin.telemetry("TOKEN_A") == [{"ts": 1, "values": {"t": 1}}]  # delivered once, not four times
    assert requests_count(metrics, "telemetry", "500") == 1
    assert requests_count(metrics, "telemetry", "200") == 1


def test_backoff_is_capped(standin: ThingsBoardStandIn) -> None:
    sink, sleeps, _ = make_sink(standin, max_retries=6, retry_backoff_ms=100, retry_backoff_max_ms=300)
    standin.fail_next(503, 6)
    assert list(run_with(sink, lambda: sink.deliver([tel(A, 1, t=1)]))) == [Outcome.DELIVERED]
    assert len(sleeps.delays) == 6
    assert all(delay <= 0.3 for delay in sleeps.delays)
    assert sleeps.delays[-1] >= 0.15


def test_429_retry_after_is_honoured_up_to_the_cap(standin: ThingsBoardStandIn) -> None:
    sink, sleeps, _ = make_sink(standin, retry_backoff_ms=10, retry_backoff_max_ms=1500)
    standin.fail_next(429, 1, headers={"Retry-After": "1"})
    standin.fail_next(429, 1, headers={"Retry-After": "3600"})
    standin.fail_next(429, 1, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # date form: ignored
    assert list(run_with(sink, lambda: sink.deliver([tel(A, 1, t=1)]))) == [Outcome.DELIVERED]
    assert sleeps.delays[0] == 1.0
    assert sleeps.delays[1] == 1.5
    assert sleeps.delays[2] < 0.1


def test_backend_refusing_connections_raises_retriable_then_recovers(standin: ThingsBoardStandIn) -> None:
    sink, sleeps, metrics = make_sink(standin, max_retries=2)

    async def body() -> None:
        assert list(await sink.deliver([tel(A, 1, t=1)])) == [Outcome.DELIVERED]
        standin.go_down("refuse")  # also resets the kept-alive connection
        with pytest.raises(RetriableSinkError, match="ClientConnectorError"):
            await sink.deliver([tel(A, 2, t=2), tel(B, 2, t=2)])
        health = sink.health()
        assert health["status"] == "down" and health["consecutive_failures"] == 1
        assert "ClientConnectorError" in health["last_error"]
        standin.come_back()
        assert list(await sink.deliver([tel(A, 3, t=3)])) == [Outcome.DELIVERED]
        assert sink.health()["status"] == "up"

    run_with(sink, body)
    assert [e["ts"] for e in standin.telemetry("TOKEN_A")] == [1, 3]
    assert requests_count(metrics, "telemetry", "error") >= 3  # at least one device: 1 try + 2 retries
    assert len(sleeps.delays) >= 2


def test_backend_answering_503_raises_retriable(standin: ThingsBoardStandIn) -> None:
    sink, sleeps, metrics = make_sink(standin, max_retries=1)
    standin.go_down("503")
    with pytest.raises(RetriableSinkError, match="HTTP 503"):
        run_with(sink, lambda: sink.deliver([attr(A, 1, x=1)]))
    assert requests_count(metrics, "attributes", "503") == 2
    assert len(sleeps.delays) == 1
    assert standin.received == []


def test_slow_backend_times_out_and_is_retriable(standin: ThingsBoardStandIn) -> None:
    sink, _, metrics = make_sink(standin, timeout_s=0.2, max_retries=0)
    standin.delay_s = 0.6
    with pytest.raises(RetriableSinkError, match="Timeout"):
        run_with(sink, lambda: sink.deliver([tel(A, 1, t=1)]))
    assert requests_count(metrics, "telemetry", "error") == 1


def test_unknown_token_rejects_only_that_devices_records_and_fires_the_hook(
    standin: ThingsBoardStandIn,
) -> None:
    revoked: list[str] = []
    sink, sleeps, metrics = make_sink(standin, on_token_rejected=revoked.append)
    standin.remove_token(B.token)
    batch = [tel(A, 1, t=1), tel(B, 1, t=1), attr(B, 2, x=1), attr(A, 2, x=1)]
    outcomes = run_with(sink, lambda: sink.deliver(batch))
    assert list(outcomes) == [Outcome.DELIVERED, Outcome.REJECTED, Outcome.REJECTED, Outcome.DELIVERED]
    assert revoked == ["TOKEN_B", "TOKEN_B"]  # once per refused request
    assert sleeps.delays == []  # a permanent answer is not retried
    assert requests_count(metrics, "telemetry", "401") == 1
    assert sink.health()["status"] == "up"  # the backend answered: it is not down


@pytest.mark.parametrize("status", [400, 403, 404, 413])
def test_other_4xx_are_permanent(standin: ThingsBoardStandIn, status: int) -> None:
    revoked: list[str] = []
    sink, sleeps, metrics = make_sink(standin, on_token_rejected=revoked.append, max_connections=1)
    standin.fail_next(status, 1, body=b'"no"')
    outcomes = run_with(sink, lambda: sink.deliver([tel(A, 1, t=1), tel(A, 2, t=2)]))
    assert list(outcomes) == [Outcome.REJECTED, Outcome.REJECTED]
    assert sleeps.delays == [] and revoked == []
    assert requests_count(metrics, "telemetry", str(status)) == 1


def test_payload_over_the_backend_limit_rejects_that_request_only() -> None:
    with ThingsBoardStandIn((A.token, B.token), max_payload_bytes=500) as server:
        sink, sleeps, _ = make_sink(server)
        big = tel(A, 1, blob="x" * 600)
        batch = [big, attr(A, 2, small=1), tel(B, 3, t=1)]
        outcomes = run_with(sink, lambda: sink.deliver(batch))
        assert list(outcomes) == [Outcome.REJECTED, Outcome.DELIVERED, Outcome.DELIVERED]
        assert sleeps.delays == []
        assert 413 in [a.status for a in server.answered]
        assert server.client_attributes("TOKEN_A") == {"small": 1}


def test_device_without_token_is_rejected_without_a_request(standin: ThingsBoardStandIn) -> None:
    nobody = DeviceIdentity(id="basic-1", name="mqtt-basic-device", token="")
    sink, _, _ = make_sink(standin)
    outcomes = run_with(sink, lambda: sink.deliver([tel(nobody, 1, t=1), tel(A, 1, t=1)]))
    assert list(outcomes) == [Outcome.REJECTED, Outcome.DELIVERED]
    assert all(a.path == "/api/v1/TOKEN_A/telemetry" for a in standin.answered)


def test_token_is_one_escaped_path_segment(standin: ThingsBoardStandIn) -> None:
    odd = DeviceIdentity(id="odd", name="odd", token="a/b?c#d e")
    standin.add_token(odd.token)
    sink, _, _ = make_sink(standin)
    assert list(run_with(sink, lambda: sink.deliver([tel(odd, 1, t=1)]))) == [Outcome.DELIVERED]
    assert standin.telemetry(odd.token) == [{"ts": 1, "values": {"t": 1}}]


def test_unserializable_value_is_rejected_not_raised(standin: ThingsBoardStandIn) -> None:
    sink, _, _ = make_sink(standin)
    outcomes = run_with(sink, lambda: sink.deliver([tel(A, 1, bad={1, 2}), tel(B, 1, t=1)]))
    assert list(outcomes) == [Outcome.REJECTED, Outcome.DELIVERED]


def test_through_the_pipeline_answers_each_message(standin: ThingsBoardStandIn) -> None:
    """Pipeline + sink: a good device is acked, a revoked one refused, an outage becomes SINK_FAILED."""
    standin.remove_token(B.token)
    sink, _, metrics = make_sink(standin, max_retries=0)

    async def body() -> None:
        pipeline = Pipeline(sink, metrics, batch_size=10, batch_timeout_s=0.01, max_queue=100)
        runner = asyncio.create_task(pipeline.run())
        good, bad = pipeline.submit([tel(A, 1, t=1)]), pipeline.submit([tel(B, 1, t=1)])
        assert isinstance(good, asyncio.Future) and isinstance(bad, asyncio.Future)
        assert await good is Outcome.DELIVERED
        assert await bad is Outcome.REJECTED
        standin.go_down("503")
        down = pipeline.submit([tel(A, 2, t=2)])
        assert isinstance(down, asyncio.Future)
        assert await down is Outcome.SINK_FAILED
        pipeline.close()
        await runner

    run_with(sink, body)
    rejected = metrics.registry.get_sample_value("tb_gateway_records_failed_total", {"outcome": "rejected"})
    assert rejected == 1


def test_a_device_that_keeps_failing_is_sink_failed_while_the_others_get_through(
    standin: ThingsBoardStandIn,
) -> None:
    sink, _, _ = make_sink(standin, max_retries=2)
    standin.fail_next(503, 3, token=B.token)  # every try of B's first request
    batch = [tel(A, 1, t=1), tel(B, 1, t=1), attr(B, 2, x=1), tel(B, 3, t=3), attr(A, 4, y=1)]

    async def body() -> None:
        outcomes = await sink.deliver(batch)
        # B's telemetry failed, so its attributes were not even tried: nothing of B overtakes the retry
        assert list(outcomes) == [
            Outcome.DELIVERED,
            Outcome.SINK_FAILED,
            Outcome.SINK_FAILED,
            Outcome.SINK_FAILED,
            Outcome.DELIVERED,
        ]
        assert sink.health()["status"] == "degraded" and "HTTP 503" in sink.health()["last_error"]
        assert list(await sink.deliver([tel(B, 5, t=5)])) == [Outcome.DELIVERED]
        assert sink.health()["status"] == "up"

    run_with(sink, body)
    assert not any(r.token == B.token and r.endpoint == "attributes" for r in standin.received)


def test_spooling_wrapper_keeps_every_record_through_an_outage(standin: ThingsBoardStandIn, tmp_path: Path) -> None:
    """SpoolingSink(ThingsBoardSink): acked while down, replayed in per-device order when the backend is back."""
    metrics = Metrics()
    primary = ThingsBoardSink(
        standin.base_url, metrics, timeout_s=1.0, max_retries=1, retry_backoff_ms=10, retry_backoff_max_ms=20
    )
    sink = SpoolingSink(
        primary, Spool(tmp_path / "spool", 10_000_000), metrics, backoff_initial_s=0.05, backoff_max_s=0.2
    )

    async def body() -> None:
        await sink.start()
        replay = asyncio.create_task(sink.run())
        try:
            sent = 0
            for phase in ("up", "down", "back"):
                if phase == "down":
                    standin.go_down("refuse")
                if phase == "back":
                    standin.come_back()
                for _ in range(5):
                    batch = [tel(A, sent, n=sent), tel(B, sent, n=sent), attr(A, sent, last=sent)]
                    assert list(await sink.deliver(batch)) == [Outcome.DELIVERED] * 3
                    sent += 1
                if phase == "down":
                    assert sink.health()["status"] == "degraded"
                    assert sink.spool.records > 0
            await eventually(lambda: not sink.spool.records and len(standin.telemetry(B.token)) >= sent)
        finally:
            await sink.close()
            await replay

    asyncio.run(body())
    for token in (A.token, B.token):
        values = [e["values"]["n"] for e in standin.telemetry(token)]
        assert last_copies(values) == list(range(15))  # nothing lost, per-device order kept
    assert standin.client_attributes(A.token) == {"last": 14}
