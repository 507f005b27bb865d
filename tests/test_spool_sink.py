"""SpoolingSink over a scripted primary: spooling, replay order, cap, restart, concurrency (no Kafka)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.errors import PermanentSinkError, RetriableSinkError
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.reliable import SpoolingSink
from tb_gateway.sinks.spool import ENTRY_HEADER, Spool, encode_record


def rec(device: str, seq: int) -> Record:
    return Record(
        device=DeviceIdentity(id=f"id-{device}", name=device, token=f"t-{device}"),
        kind=RecordKind.TELEMETRY,
        ts=seq,
        values={"seq": seq},
        transport=Transport.HTTP,
        received_at=1_000 + seq,
    )


class Primary:
    """A backend whose answers the test scripts: up or down, per-device rejections, per-record failures."""

    name = "fake"

    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self.up = True
        self.raise_permanent = False
        self.reject: set[str] = set()  # device names refused for good
        self.fail_seq: set[int] = set()  # seqs that fail transiently (a gap inside a batch)
        self.taken: list[Record] = []  # every record it accepted, in order, duplicates included
        self.calls = 0
        self.delay_s = 0.0
        self.reports_down = False
        self.closed = False

    async def start(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        """Like Kafka, the order is fixed when the call is made (produce order); the answer comes later."""
        self.calls += 1
        up, permanent = self.up, self.raise_permanent
        out = []
        for r in batch:
            if not up or permanent:
                break
            if r.device.name in self.reject:
                out.append(Outcome.REJECTED)
            elif r.values["seq"] in self.fail_seq:
                out.append(Outcome.SINK_FAILED)
            else:
                self.taken.append(r)
                out.append(Outcome.DELIVERED)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if permanent:
            raise PermanentSinkError("never")
        if not up:
            raise RetriableSinkError("backend down")
        return out

    async def close(self) -> None:
        self.closed = True

    def health(self) -> dict[str, Any]:
        return {"status": "down" if self.reports_down else "up"}


def make(tmp_path: Path, primary: Primary, max_bytes: int = 10_000_000, **kw: Any) -> SpoolingSink:
    return SpoolingSink(
        primary,
        Spool(tmp_path / "spool", max_bytes),
        Metrics(),
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        **kw,
    )


def last_copies(taken: list[Record]) -> dict[str, list[int]]:
    """Per device, the order of the LAST copy of each record: the order the docs promise."""
    last: dict[tuple[str, int], int] = {}
    for i, r in enumerate(taken):
        last[(r.device.name, r.values["seq"])] = i
    per: dict[str, list[tuple[int, int]]] = {}
    for (device, seq), i in last.items():
        per.setdefault(device, []).append((i, seq))
    return {d: [seq for _, seq in sorted(pairs)] for d, pairs in per.items()}


async def until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll the spool depth, which the replay task changes: there is no event for it."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def drained(sink: SpoolingSink) -> None:
    await until(lambda: sink.spool.records == 0)


async def with_replay(sink: SpoolingSink, body: Any) -> Any:
    await sink.start()
    runner = asyncio.create_task(sink.run())
    try:
        return await body()
    finally:
        await sink.close()
        await asyncio.wait_for(runner, 5)


def test_a_backend_down_on_a_quiet_gateway_is_degraded_not_down(tmp_path: Path) -> None:
    """Nothing spooled yet, the backend down: the gateway still takes messages (into the spool), so /health
    must not take it out of a load balancer (it said down until the first message was spooled)."""
    primary = Primary()
    primary.reports_down = True
    sink = make(tmp_path, primary)
    assert sink.spool.records == 0
    assert sink.health()["status"] == "degraded"
    primary.reports_down = False
    assert sink.health()["status"] == "up"


def test_healthy_primary_passes_through_and_spool_stays_empty(tmp_path: Path) -> None:
    primary = Primary()
    sink = make(tmp_path, primary)

    async def body() -> None:
        out = await sink.deliver([rec("a", 1), rec("b", 1)])
        assert list(out) == [Outcome.DELIVERED, Outcome.DELIVERED]
        assert sink.spool.records == 0
        assert sink.health()["status"] == "up"

    asyncio.run(with_replay(sink, body))
    assert [r.values["seq"] for r in primary.taken] == [1, 1]
    assert primary.closed


def test_a_batch_with_nothing_to_wait_for_settles_without_suspending(tmp_path: Path) -> None:
    """Once the earlier batch has settled, the next must not wait on it: awaiting a done future still costs
    two passes of the event loop, about 1 ms each under load, on every Kafka batch."""
    primary = Primary()
    sink = make(tmp_path, primary)

    def settles_at_once(batch: list[Record]) -> Sequence[Outcome]:
        coro = sink.deliver(batch)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        coro.close()
        raise AssertionError("deliver suspended")

    async def body() -> None:
        assert list(settles_at_once([rec("a", 1)])) == [Outcome.DELIVERED]
        assert list(settles_at_once([rec("a", 2), rec("b", 1)])) == [Outcome.DELIVERED, Outcome.DELIVERED]

    asyncio.run(with_replay(sink, body))
    assert [r.values["seq"] for r in primary.taken] == [1, 2, 1]


def test_backend_down_spools_acks_and_replays_in_order(tmp_path: Path) -> None:
    primary = Primary()
    sink = make(tmp_path, primary)
    metrics_sink = sink

    async def body() -> None:
        assert await sink.deliver([rec("a", 1)]) == [Outcome.DELIVERED]
        primary.up = False
        assert list(await sink.deliver([rec("a", 2), rec("b", 1)])) == [Outcome.DELIVERED] * 2
        calls = primary.calls
        assert list(await sink.deliver([rec("a", 3)])) == [Outcome.DELIVERED]
        assert primary.calls - calls <= 2  # new batch went to the spool, not to the primary (replay may probe)
        health = sink.health()
        assert health["status"] == "degraded"
        assert health["spool"]["records"] >= 1
        primary.up = True
        await drained(sink)
        assert sink.health()["status"] == "up"
        calls = primary.calls
        assert await sink.deliver([rec("a", 4)]) == [Outcome.DELIVERED]  # direct again
        assert primary.calls == calls + 1

    asyncio.run(with_replay(sink, body))
    assert last_copies(primary.taken) == {"a": [1, 2, 3, 4], "b": [1]}
    text = metrics_sink._metrics.render().decode()
    assert 'tb_gateway_spool_appended_total{sink="fake"} 3.0' in text
    assert 'tb_gateway_spool_replayed_total{sink="fake"} 3.0' in text
    assert 'tb_gateway_spool_records{sink="fake"} 0.0' in text


def test_primary_reporting_down_is_not_called_for_new_batches(tmp_path: Path) -> None:
    primary = Primary()
    primary.reports_down = True
    primary.up = False
    sink = make(tmp_path, primary)

    async def body() -> None:
        await sink.start()
        assert list(await sink.deliver([rec("a", 1), rec("a", 2)])) == [Outcome.DELIVERED] * 2
        assert primary.calls == 0
        assert sink.spool.records == 2
        await sink.close()

    asyncio.run(body())


def test_a_gap_inside_a_batch_spools_the_device_rest_too(tmp_path: Path) -> None:
    """a2 fails but a3 got through: a3 is spooled again behind a2, so the last copies stay in order."""
    primary = Primary()
    primary.fail_seq = {2}
    sink = make(tmp_path, primary)

    async def body() -> None:
        out = await sink.deliver([rec("a", 1), rec("a", 2), rec("b", 5), rec("a", 3)])
        assert list(out) == [Outcome.DELIVERED] * 4
        assert sink.spool.devices == {"id-a": 2}  # a2 and a3; b5 is unaffected
        primary.fail_seq = set()
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert last_copies(primary.taken) == {"a": [1, 2, 3], "b": [5]}


def test_rejected_records_are_answered_and_not_spooled(tmp_path: Path) -> None:
    primary = Primary()
    primary.reject = {"bad"}
    sink = make(tmp_path, primary)

    async def body() -> None:
        out = await sink.deliver([rec("good", 1), rec("bad", 1), rec("good", 2)])
        assert list(out) == [Outcome.DELIVERED, Outcome.REJECTED, Outcome.DELIVERED]
        assert sink.spool.records == 0

    asyncio.run(with_replay(sink, body))


def test_spool_full_refuses_visibly_and_loses_nothing_acked(tmp_path: Path) -> None:
    one = ENTRY_HEADER.size + len(encode_record(rec("a", 10)))
    primary = Primary()
    primary.up = False
    primary.reports_down = True
    sink = make(tmp_path, primary, max_bytes=one * 5)
    acked: list[int] = []
    refused: list[int] = []

    async def body() -> None:
        for seq in range(10, 20):
            outcome = (await sink.deliver([rec("a", seq)]))[0]
            (acked if outcome is Outcome.DELIVERED else refused).append(seq)
            assert outcome in (Outcome.DELIVERED, Outcome.SPOOL_FULL)
        assert sink.health()["status"] == "down"  # full and the backend down
        primary.up = True
        primary.reports_down = False
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert acked == list(range(10, 15))
    assert refused == list(range(15, 20))
    assert [r.values["seq"] for r in primary.taken] == acked


def test_restart_replays_what_a_previous_process_spooled(tmp_path: Path) -> None:
    first = Primary()
    first.up = False

    async def spool_some() -> None:
        sink = make(tmp_path, first)
        await sink.start()
        assert list(await sink.deliver([rec("a", i) for i in range(5)])) == [Outcome.DELIVERED] * 5
        sink.spool.close()  # no clean shutdown: the process dies here

    asyncio.run(spool_some())
    second = Primary()
    sink = make(tmp_path, second)

    async def body() -> None:
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert [r.values["seq"] for r in second.taken] == [0, 1, 2, 3, 4]


def test_replay_commits_up_to_the_first_failure_and_retries_the_rest(tmp_path: Path) -> None:
    primary = Primary()
    primary.up = False
    sink = make(tmp_path, primary, replay_chunk_records=10)

    async def body() -> None:
        await sink.deliver([rec("a", i) for i in range(6)])
        primary.fail_seq = {3}
        primary.up = True
        await until(lambda: sink.spool.records <= 3)
        assert sink.spool.records == 3  # 3, 4, 5 stay until 3 gets through
        primary.fail_seq = set()
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert last_copies(primary.taken) == {"a": [0, 1, 2, 3, 4, 5]}
    assert [r.values["seq"] for r in primary.taken][:3] == [0, 1, 2]


def test_permanent_error_on_replay_drops_and_counts(tmp_path: Path) -> None:
    primary = Primary()
    primary.up = False
    sink = make(tmp_path, primary)

    async def body() -> None:
        await sink.deliver([rec("a", 1), rec("a", 2)])
        primary.up = True
        primary.raise_permanent = True
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert 'tb_gateway_records_failed_total{outcome="rejected"} 2.0' in sink._metrics.render().decode()


def test_permanent_error_on_a_direct_batch_is_raised(tmp_path: Path) -> None:
    primary = Primary()
    primary.raise_permanent = True
    sink = make(tmp_path, primary)

    async def body() -> None:
        with pytest.raises(PermanentSinkError):
            await sink.deliver([rec("a", 1)])
        assert sink.spool.records == 0

    asyncio.run(with_replay(sink, body))


def test_a_later_batch_that_succeeded_is_spooled_behind_an_earlier_failed_one(tmp_path: Path) -> None:
    """Two batches in flight: the first fails slowly, the second succeeds at once; results settle in order."""
    primary = Primary(max_in_flight=2)
    sink = make(tmp_path, primary)

    async def body() -> None:
        primary.up = False
        primary.delay_s = 0.05
        first = asyncio.create_task(sink.deliver([rec("a", 1), rec("b", 1)]))
        await asyncio.sleep(0)
        primary.up = True
        primary.delay_s = 0.0
        second = asyncio.create_task(sink.deliver([rec("a", 2), rec("c", 1)]))
        assert list(await second) == [Outcome.DELIVERED] * 2
        assert first.done()  # settled in arrival order
        assert sink.spool.devices.keys() <= {"id-a", "id-b"}
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert last_copies(primary.taken) == {"a": [1, 2], "b": [1], "c": [1]}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_outages_never_lose_or_reorder(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """Concurrent batches, random outages and in-batch gaps: every acked record is taken, last copies in order."""
    rng = random.Random(seed)
    primary = Primary(max_in_flight=3)
    sink = make(tmp_path_factory.mktemp("sp"), primary, replay_chunk_records=rng.choice([1, 3, 50]))
    acked: dict[str, list[int]] = {}

    async def one(batch: list[Record]) -> None:
        outcomes = await sink.deliver(batch)
        for r, o in zip(batch, outcomes, strict=True):
            assert o is Outcome.DELIVERED
            acked.setdefault(r.device.name, []).append(r.values["seq"])

    async def body() -> None:
        seq = 0
        slots = asyncio.Semaphore(3)
        tasks = []
        for _ in range(40):
            primary.up = rng.random() > 0.3
            primary.fail_seq = {seq + rng.randrange(8)} if rng.random() < 0.2 else set()
            primary.delay_s = rng.choice([0, 0, 0.001, 0.003])
            batch = [rec(rng.choice("abc"), seq + i) for i in range(rng.randrange(1, 6))]
            seq += len(batch)
            await slots.acquire()
            task = asyncio.create_task(one(batch))
            task.add_done_callback(lambda _t: slots.release())
            tasks.append(task)
            await asyncio.sleep(rng.choice([0, 0, 0.001]))
        await asyncio.gather(*tasks)
        primary.up, primary.fail_seq, primary.delay_s = True, set(), 0.0
        await drained(sink)

    asyncio.run(with_replay(sink, body))
    assert last_copies(primary.taken) == {d: sorted(s) for d, s in acked.items()}
    assert all(s == sorted(s) for s in acked.values())


def test_close_while_a_replay_chunk_is_in_flight_keeps_it_for_next_time(tmp_path: Path) -> None:
    primary = Primary()
    primary.up = False

    async def body() -> None:
        sink = make(tmp_path, primary)
        await sink.start()
        runner = asyncio.create_task(sink.run())
        await sink.deliver([rec("a", 1), rec("a", 2)])
        primary.up = True
        primary.delay_s = 0.2
        await until(lambda: primary.calls >= 2)  # the replay chunk is at the primary now
        await sink.close()
        await asyncio.wait_for(runner, 5)  # ends quietly, nothing raised

    asyncio.run(body())
    again = Spool(tmp_path / "spool", 10_000_000)
    again.open()
    assert again.records == 2  # not committed before the close: replayed after restart (a duplicate)
    again.close()
