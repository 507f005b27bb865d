"""Pipeline: admission, batching bounds, per-device order, nothing lost, outcomes, shutdown flush."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway import pipeline as pipeline_module
from tb_gateway.errors import RetriableSinkError
from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import GROUP_COMMIT_ENOUGH, Pipeline, when_settled
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tests.support import CallbackMemorySink, MemorySink

# the pipeline awaits a plain sink's deliver in a task, and hands a CallbackSink its batch with a callback
each_sink_kind = pytest.mark.parametrize("sink_class", [MemorySink, CallbackMemorySink])

DEVICES = [DeviceIdentity(f"id{n}", f"dev{n}") for n in range(4)]


def record(device: int, seq: int) -> Record:
    return Record(DEVICES[device], RecordKind.TELEMETRY, seq, {"seq": seq}, Transport.HTTP, 0)


def run(
    test: Callable[[Pipeline, MemorySink], Awaitable[Any]],
    sink: MemorySink | None = None,
    **options: Any,
) -> Any:
    sink = sink or MemorySink()
    options = {"batch_size": 10, "batch_timeout_s": 3600.0, "max_queue": 1000, **options}

    async def main() -> Any:
        pipeline = Pipeline(sink, Metrics(), **options)
        runner = asyncio.create_task(pipeline.run())
        try:
            return await test(pipeline, sink)
        finally:
            pipeline.close()
            await asyncio.wait_for(runner, 10)

    return asyncio.run(main())


@each_sink_kind
@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=60),
    batch_size=st.integers(1, 16),
    in_flight=st.integers(1, 3),
    yields=st.lists(st.booleans(), max_size=60),
)
def test_nothing_lost_order_kept_batches_bounded(
    sink_class: type[MemorySink], messages: list[tuple[int, int]], batch_size: int, in_flight: int, yields: list[bool]
) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        futures = []
        seq = 0
        for index, (device, count) in enumerate(messages):
            records = [record(device, seq + i) for i in range(count)]
            seq += count
            admitted = pipeline.submit(records)
            assert isinstance(admitted, asyncio.Future)
            futures.append(admitted)
            if index < len(yields) and yields[index]:
                await asyncio.sleep(0)  # let some batches leave mid-stream
        assert set(await asyncio.gather(*futures)) == {Outcome.DELIVERED}
        delivered = sink.records
        assert sorted(r.ts for r in delivered) == list(range(seq))  # each record exactly once
        for device in range(4):
            mine = [r.ts for r in delivered if r.device is DEVICES[device]]
            assert mine == sorted(mine)  # per-device order
        assert all(1 <= len(batch) <= batch_size for batch in sink.batches)

    # with several deliveries in flight, order holds only when the sink keeps one at a time per device;
    # the pipeline's guarantee is order of hand-over, so check it with one slot and the bound with many
    run(scenario, sink_class(max_in_flight=1), batch_size=batch_size)
    if in_flight > 1:
        sink = sink_class(max_in_flight=in_flight)

        async def bounded(pipeline: Pipeline, sink: MemorySink) -> None:
            futures = [pipeline.submit([record(d, i)]) for i, (d, _) in enumerate(messages)]
            await asyncio.gather(*[f for f in futures if isinstance(f, asyncio.Future)])
            assert sorted(r.ts for r in sink.records) == list(range(len(messages)))
            assert all(len(batch) <= batch_size for batch in sink.batches)

        run(bounded, sink, batch_size=batch_size)


@each_sink_kind
def test_lone_message_on_idle_gateway_does_not_wait_for_the_timeout(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        admitted = pipeline.submit([record(0, 1)])
        assert isinstance(admitted, asyncio.Future)
        # the batch timeout is an hour: resolving at all proves the batch left at once
        assert await asyncio.wait_for(admitted, 5) is Outcome.DELIVERED

    run(scenario, sink_class(), batch_timeout_s=3600.0)


@each_sink_kind
def test_group_commit_spaces_batches_under_a_steady_stream_but_not_a_lone_message(sink_class: type[MemorySink]) -> None:
    """The embedded store's group commit (STORE_COMMIT_INTERVAL): one batch per interval under load."""
    interval = 0.05

    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(pipeline.submit([record(0, 0)]), 5) is Outcome.DELIVERED  # type: ignore[arg-type]
        assert loop.time() - started < interval / 2  # after a quiet spell: at once
        pending = []
        for seq in range(1, 31):  # a steady stream, one message every 5 ms, for 150 ms
            pending.append(pipeline.submit([record(0, seq)]))
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)  # type: ignore[arg-type]
        assert sum(len(batch) for batch in sink.batches) == 31
        # one batch per 50 ms interval at most (plus the first), instead of one per message
        assert len(sink.batches) <= 1 + 150 / 50 + 2, [len(batch) for batch in sink.batches]
        assert max(len(batch) for batch in sink.batches) > 1

    run(scenario, sink_class(), batch_size=100, commit_interval_s=interval)


@each_sink_kind
def test_group_commit_does_not_hold_a_batch_that_is_already_big_enough(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        await asyncio.wait_for(pipeline.submit([record(0, 0)]), 5)  # type: ignore[arg-type]
        burst = [pipeline.submit([record(0, seq)]) for seq in range(1, 1 + GROUP_COMMIT_ENOUGH)]
        # the interval is an hour: resolving at all proves a full-enough batch did not wait for it
        await asyncio.wait_for(asyncio.gather(*burst), 5)  # type: ignore[arg-type]
        assert [len(batch) for batch in sink.batches] == [1, GROUP_COMMIT_ENOUGH]

    run(scenario, sink_class(), batch_size=1000, commit_interval_s=3600.0)


@each_sink_kind
def test_without_group_commit_every_message_leaves_at_once(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        for seq in range(10):
            await asyncio.wait_for(pipeline.submit([record(0, seq)]), 5)  # type: ignore[arg-type]
        assert [len(batch) for batch in sink.batches] == [1] * 10

    run(scenario, sink_class(), batch_size=100)


@each_sink_kind
def test_batch_fills_while_the_sink_is_busy(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.gate.clear()
        first = pipeline.submit([record(0, 0)])
        await asyncio.sleep(0.01)  # first batch is now stuck in the sink
        rest = [pipeline.submit([record(1, i)]) for i in range(1, 26)]
        sink.gate.set()
        await asyncio.gather(first, *rest)  # type: ignore[arg-type]
        assert [len(b) for b in sink.batches] == [1, 10, 10, 5]

    run(scenario, sink_class(), batch_size=10)


@each_sink_kind
def test_batch_timeout_bounds_the_linger_while_the_sink_is_busy(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        slow = pipeline.submit([record(0, 0)])  # occupies one of two slots for a long time
        await asyncio.sleep(0.01)
        lingering = pipeline.submit([record(1, 1)])
        # the slow delivery is still running, the batch is not full: it leaves at the timeout
        assert await asyncio.wait_for(lingering, 5) is Outcome.DELIVERED  # type: ignore[arg-type]
        assert not slow.done()  # type: ignore[union-attr]
        await slow  # type: ignore[misc]

    run(scenario, slow_first(sink_class(max_in_flight=2), 1.0), batch_size=100, batch_timeout_s=0.05)


def slow_first(sink: MemorySink, delay_s: float) -> MemorySink:
    """The batch holding the record with ts 0 takes ``delay_s`` to deliver; the others go at once."""
    deliver = sink.deliver

    async def slowly(batch: Any) -> Any:
        if batch[0].ts == 0:
            await asyncio.sleep(delay_s)
        return await deliver(batch)

    sink.deliver = slowly  # type: ignore[method-assign]
    return sink


@each_sink_kind
def test_while_the_sink_is_busy_a_batch_lingers_to_fill(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        slow = pipeline.submit([record(0, 0)])  # takes one of the two slots for a second
        await asyncio.sleep(0.01)
        rest = []
        for seq in (1, 2, 3):  # the sink is busy: these wait together for the batch timeout
            rest.append(pipeline.submit([record(1, seq)]))
            await asyncio.sleep(0.01)
        assert set(await asyncio.gather(*rest)) == {Outcome.DELIVERED}  # type: ignore[arg-type]
        assert [[r.ts for r in batch] for batch in sink.batches] == [[1, 2, 3]]
        await slow  # type: ignore[misc]

    run(scenario, slow_first(sink_class(max_in_flight=2), 1.0), batch_size=100, batch_timeout_s=0.2)


@each_sink_kind
def test_a_lingering_batch_leaves_at_the_commit_interval_once_a_slot_frees(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        first = pipeline.submit([record(0, 0)])  # delivered in 20 ms
        await asyncio.sleep(0.005)
        second = pipeline.submit([record(1, 1)])  # lingers: the sink is busy and the batch timeout is an hour
        # the first delivery frees its slot: the second leaves once the group-commit interval has passed
        assert await asyncio.wait_for(second, 5) is Outcome.DELIVERED  # type: ignore[arg-type]
        await first  # type: ignore[misc]

    sink = slow_first(sink_class(max_in_flight=2), 0.02)
    run(scenario, sink, batch_size=100, batch_timeout_s=3600.0, commit_interval_s=0.05)


@each_sink_kind
def test_full_queue_refuses_whole_messages_at_once(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.gate.clear()
        first = pipeline.submit([record(0, 0)])
        await asyncio.sleep(0.01)
        ok = pipeline.submit([record(0, i) for i in range(1, 4)])
        assert isinstance(ok, asyncio.Future)
        assert pipeline.submit([record(0, 10), record(0, 11)]) is Outcome.QUEUE_FULL  # 3 + 2 > 4
        assert not pipeline.has_room(2)
        assert isinstance(pipeline.submit([record(0, 4)]), asyncio.Future)  # exactly fits
        sink.gate.set()
        await asyncio.gather(first, ok)  # type: ignore[arg-type]
        assert 10 not in [r.ts for r in sink.records]

    run(scenario, sink_class(), max_queue=4)


@each_sink_kind
def test_wait_for_room_returns_once_the_queue_drains(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.gate.clear()
        pipeline.submit([record(0, 0)])
        await asyncio.sleep(0.01)
        pipeline.submit([record(0, 1), record(0, 2)])
        waiter = asyncio.create_task(pipeline.wait_for_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        sink.gate.set()
        await asyncio.wait_for(waiter, 5)

    run(scenario, sink_class(), max_queue=2)


@each_sink_kind
def test_sink_failure_answers_the_batch_and_the_pipeline_goes_on(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.fail_with = RetriableSinkError("backend down")
        assert await pipeline.submit([record(0, 0)]) is Outcome.SINK_FAILED  # type: ignore[misc]
        sink.fail_with = None
        assert await pipeline.submit([record(0, 1)]) is Outcome.DELIVERED  # type: ignore[misc]

    run(scenario, sink_class())


@each_sink_kind
def test_a_message_gets_the_worst_outcome_of_its_records(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.outcome_for["dev1"] = Outcome.REJECTED
        mixed = pipeline.submit([record(0, 0), record(1, 1)])
        assert await mixed is Outcome.REJECTED  # type: ignore[misc]

    run(scenario, sink_class())


@each_sink_kind
def test_empty_message_is_answered_at_once(sink_class: type[MemorySink]) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        assert pipeline.submit([]) is Outcome.DELIVERED
        assert sink.batches == []

    run(scenario, sink_class())


@each_sink_kind
def test_close_flushes_everything_admitted_and_refuses_the_rest(sink_class: type[MemorySink]) -> None:
    sink = sink_class(delay_s=0.01)

    async def main() -> None:
        pipeline = Pipeline(sink, Metrics(), batch_size=3, batch_timeout_s=3600.0, max_queue=100)
        runner = asyncio.create_task(pipeline.run())
        futures = [pipeline.submit([record(0, i)]) for i in range(20)]
        pipeline.close()
        assert pipeline.submit([record(0, 99)]) is Outcome.SHUTTING_DOWN
        await asyncio.wait_for(runner, 10)
        assert all(f.done() and f.result() is Outcome.DELIVERED for f in futures)  # type: ignore[union-attr]
        assert [r.ts for r in sink.records] == list(range(20))

    asyncio.run(main())


@each_sink_kind
def test_an_unexpected_sink_exception_answers_the_batch_without_stopping_the_pipeline(
    sink_class: type[MemorySink], caplog: Any
) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.fail_with = ZeroDivisionError("bug")
        assert await pipeline.submit([record(0, 0)]) is Outcome.SINK_FAILED  # type: ignore[misc]
        sink.fail_with = None
        assert await pipeline.submit([record(0, 1)]) is Outcome.DELIVERED  # type: ignore[misc]

    run(scenario, sink_class())
    assert "raised unexpectedly" in caplog.text


def test_a_callback_sink_that_cannot_start_a_delivery_answers_the_batch_and_the_pipeline_goes_on(
    caplog: Any,
) -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        assert isinstance(sink, CallbackMemorySink)
        sink.raise_at_once = RetriableSinkError("cannot start")
        assert await pipeline.submit([record(0, 0)]) is Outcome.SINK_FAILED  # type: ignore[misc]
        sink.raise_at_once = ZeroDivisionError("bug")
        assert await pipeline.submit([record(0, 1)]) is Outcome.SINK_FAILED  # type: ignore[misc]
        sink.raise_at_once = None
        assert await pipeline.submit([record(0, 2)]) is Outcome.DELIVERED  # type: ignore[misc]
        assert [r.ts for r in sink.records] == [2]

    run(scenario, CallbackMemorySink())
    assert "cannot start" in caplog.text and "raised unexpectedly" in caplog.text


@each_sink_kind
def test_when_settled_runs_in_the_turn_that_settles_the_batch_after_all_its_tickets(
    sink_class: type[MemorySink],
) -> None:
    """No scheduling hop between a batch's outcome and the transports' answers (each costs a loop pass)."""

    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        sink.gate.clear()
        tickets = [pipeline.submit([record(n, n)]) for n in range(3)]
        assert all(isinstance(t, asyncio.Future) for t in tickets)
        seen: list[Any] = []

        def direct(future: asyncio.Future[Outcome]) -> None:
            seen.append(("direct", future.result(), [t.done() for t in tickets]))  # type: ignore[union-attr]

        # registered first, yet called second: add_done_callback schedules, when_settled does not
        tickets[0].add_done_callback(lambda _: seen.append("scheduled"))  # type: ignore[union-attr]
        when_settled(tickets[0], direct)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert seen == []
        sink.gate.set()
        await asyncio.gather(*tickets)  # type: ignore[arg-type]
        assert seen == [("direct", Outcome.DELIVERED, [True, True, True]), "scheduled"]

    run(scenario, sink_class(), batch_size=10)


def test_when_settled_callbacks_run_in_order_and_a_failing_one_stops_no_other() -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        loop = asyncio.get_running_loop()
        reported: list[BaseException] = []
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))
        sink.gate.clear()
        first, second = pipeline.submit([record(0, 0)]), pipeline.submit([record(1, 1)])
        calls: list[str] = []

        def broken(_: Any) -> None:
            calls.append("broken")
            raise ZeroDivisionError("transport bug")

        when_settled(first, broken)  # type: ignore[arg-type]
        when_settled(first, lambda _: calls.append("first"))  # type: ignore[arg-type]
        when_settled(second, lambda _: calls.append("second"))  # type: ignore[arg-type]
        sink.gate.set()
        await asyncio.gather(first, second)  # type: ignore[arg-type]
        assert calls == ["broken", "first", "second"]
        assert [type(e) for e in reported] == [ZeroDivisionError]
        assert await pipeline.submit([record(0, 2)]) is Outcome.DELIVERED  # type: ignore[misc]

    run(scenario, CallbackMemorySink())


def test_when_settled_on_a_settled_ticket_or_another_future_still_calls_back() -> None:
    async def scenario(pipeline: Pipeline, sink: MemorySink) -> None:
        ticket = pipeline.submit([record(0, 0)])
        await ticket  # type: ignore[misc]
        other: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        calls: list[Any] = []
        when_settled(ticket, lambda f: calls.append(f.result()))  # type: ignore[arg-type]
        when_settled(other, lambda f: calls.append(f.result()))
        other.set_result(Outcome.REJECTED)
        for _ in range(3):
            await asyncio.sleep(0)
        assert calls == [Outcome.DELIVERED, Outcome.REJECTED]

    run(scenario)


def test_a_wake_up_due_within_a_millisecond_on_uvloop() -> None:
    """uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a deadline under 1 ms away: the
    batcher keeps the time itself (it once raised in the loop's callbacks under a steady stream)."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        sink = CallbackMemorySink()
        # group commit: the next batch often waits for what is left of 1.5 ms, under a millisecond
        pipeline = Pipeline(
            sink, Metrics(), batch_size=100, batch_timeout_s=3600.0, max_queue=10_000, commit_interval_s=0.0015
        )
        runner = asyncio.create_task(pipeline.run())
        pending = []
        try:
            loop = asyncio.get_running_loop()
            until = loop.time() + 0.3
            seq = 0
            while loop.time() < until:  # a record every loop pass, as a busy transport submits them
                seq += 1
                pending.append(pipeline.submit([record(seq % 4, seq)]))
                await asyncio.sleep(0)
            outcomes = await asyncio.wait_for(asyncio.gather(*pending), 5)  # type: ignore[arg-type]
            assert set(outcomes) == {Outcome.DELIVERED}
            assert sum(len(batch) for batch in sink.batches) == seq
        finally:
            pipeline.close()
            await asyncio.wait_for(runner, 10)

    uvloop.run(main())
    assert errors == []


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2), st.booleans()), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_settling_a_delivered_batch_in_c_is_the_python_loop(
    messages: list[tuple[int, int, bool]], shuffle: Any
) -> None:
    """Messages of 1-3 records, 0-2 waiters each, some cancelled by their transport; their records in a
    shuffled batch: the C settle and the Python loop resolve the same tickets and call the same waiters in
    the same order (settle_delivered and run_settled)."""
    assert pipeline_module._settle_delivered is not None, "the C extension is built in this environment"

    seed = shuffle.random()

    def settle(in_c: bool) -> list[tuple[int, bool, bool, object]]:
        async def main() -> list[tuple[int, bool, bool, object]]:
            pipeline = Pipeline(MemorySink(), Metrics(), batch_size=100, batch_timeout_s=0.01, max_queue=100)
            calls: list[object] = []
            tickets: list[Any] = []
            for index, (count, waiters, cancelled) in enumerate(messages):
                ticket = pipeline.submit([record(index % len(DEVICES), n) for n in range(count)])
                assert isinstance(ticket, asyncio.Future)
                for waiter in range(waiters):
                    when_settled(ticket, lambda done, key=(index, waiter): calls.append(key))
                if cancelled:
                    ticket.cancel()
                tickets.append(ticket)
            records, owners = pipeline._take()
            batch = list(zip(records, owners, strict=True))
            random.Random(seed).shuffle(batch)  # the same order both ways
            saved, saved_run = pipeline_module._settle_delivered, pipeline_module._run_settled
            pipeline_module._settle_delivered = saved if in_c else None
            pipeline_module._run_settled = saved_run if in_c else None
            try:
                pipeline._settle_batch([r for r, _ in batch], [t for _, t in batch], [Outcome.DELIVERED] * len(batch))
            finally:
                pipeline_module._settle_delivered, pipeline_module._run_settled = saved, saved_run
            calls_now = list(calls)
            await asyncio.sleep(0)  # the cancelled ones' waiters were scheduled: let them run too
            return [(t.pending, t.done(), t.cancelled(), None if t.cancelled() else t.result()) for t in tickets] + [
                ("calls", calls_now, calls)
            ]  # type: ignore[list-item]

        return asyncio.run(main())

    assert settle(in_c=True) == settle(in_c=False)
