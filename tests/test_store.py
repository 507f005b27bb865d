"""Embedded store sink and attribute store: durable writes, reading back, failures reported as retriable."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.attributes import CLIENT, SHARED, AttributeStore
from tb_gateway.errors import RetriableSinkError
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks import segments
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.store import StoreSink, read_messages

DEV = DeviceIdentity("id-1", "dev1", "meter")


def rec(ts: int, **values: object) -> Record:
    return Record(DEV, RecordKind.TELEMETRY, ts, dict(values), Transport.MQTT, 1000 + ts)


def test_delivered_batches_read_back_in_order_and_filtered(tmp_path: Path) -> None:
    path = tmp_path / "messages"

    async def main() -> None:
        sink = StoreSink(path)
        await sink.start()
        assert await sink.deliver([rec(1, t=1.5), rec(2, s="x", j={"a": [1]})]) == [Outcome.DELIVERED] * 2
        other = Record(DeviceIdentity("id-2", "dev2"), RecordKind.ATTRIBUTES, 3, {"fw": "1"}, Transport.HTTP, 5)
        await sink.deliver([other])
        assert sink.health()["status"] == "up"
        await sink.close()
        assert sink.health()["status"] == "down"

    asyncio.run(main())
    rows = list(read_messages(path))
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert rows[0] == {
        "seq": 1,
        "device": "dev1",
        "device_id": "id-1",
        "device_type": "meter",
        "kind": "telemetry",
        "ts": 1,
        "values": {"t": 1.5},
        "transport": "mqtt",
        "received_at": 1001,
    }
    assert rows[1]["values"] == {"s": "x", "j": {"a": [1]}}
    assert [r["device"] for r in read_messages(path, device="dev2")] == ["dev2"]
    assert [r["seq"] for r in read_messages(path, after_seq=2)] == [3]


def test_a_written_batch_is_freed_on_the_loop_not_on_the_writer_thread(tmp_path: Path) -> None:
    """The writer thread lets go of a batch before it tells the loop: freeing a batch's records and tickets
    holds the GIL, and on the writer it came first in the next batch's write (on its way to fdatasync)."""
    freed_on: list[int] = []

    class Done:
        def __init__(self, answered: asyncio.Future[Any]) -> None:
            self.answered = answered

        def __call__(self, outcomes: Any) -> None:
            self.answered.set_result(outcomes)

        def __del__(self) -> None:
            freed_on.append(threading.get_ident())

    async def main() -> None:
        sink = StoreSink(tmp_path / "messages")
        await sink.start()
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sink.deliver_then([rec(1, t=1.5)], Done(answered))
        assert await answered == [Outcome.DELIVERED]
        await sink.deliver([rec(2, t=2.5)])  # the writer takes its next job: the first one is long gone
        await sink.close()

    asyncio.run(main())
    assert freed_on == [threading.get_ident()]


def test_a_record_json_cannot_hold_is_rejected_alone_not_its_batch(tmp_path: Path, caplog: Any) -> None:
    """Defence in depth behind normalize.py: one such record used to fail every message of its batch."""
    path = tmp_path / "messages"
    deep: Any = 1
    for _ in range(300):
        deep = [deep]

    async def main() -> None:
        sink = StoreSink(path)
        await sink.start()
        batch = [rec(1, a=1), rec(2, big=2**70), rec(3, b=2), rec(4, deep=deep)]
        assert await sink.deliver(batch) == [Outcome.DELIVERED, Outcome.REJECTED, Outcome.DELIVERED, Outcome.REJECTED]
        assert await sink.deliver([rec(5, big=2**70)]) == [Outcome.REJECTED]  # nothing left to write
        await sink.close()

    asyncio.run(main())
    assert [r["ts"] for r in read_messages(path)] == [1, 3]
    assert "JSON cannot hold" in caplog.text


def test_reading_a_store_that_does_not_exist_yet_yields_nothing(tmp_path: Path) -> None:
    assert list(read_messages(tmp_path / "none")) == []


@pytest.mark.parametrize("failing", ["pwrite", "fdatasync"])
def test_write_failure_is_retriable_and_reported_in_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "messages"

    def failing_call(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segments, "_speedups", None)  # the Python path: its system calls can be made to fail

    async def main() -> None:
        sink = StoreSink(path)
        await sink.start()
        await sink.deliver([rec(1, a=1)])
        with monkeypatch.context() as patched:
            patched.setattr(segments.os, failing, failing_call)  # a failing disk
            with pytest.raises(RetriableSinkError, match=r"embedded store write failed: .*Input/output error"):
                await sink.deliver([rec(2, a=2)])
        assert sink.health()["status"] == "down"
        assert "Input/output error" in sink.health()["error"]
        assert await sink.deliver([rec(3, a=3)]) == [Outcome.DELIVERED]  # the disk is back: so is the store
        assert sink.health()["status"] == "up"
        await sink.close()

    asyncio.run(main())
    rows = list(read_messages(path))
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    # a batch written but not synced was not acknowledged, yet it may survive (a duplicate when resent)
    assert [r["ts"] for r in rows] == ([1, 3] if failing == "pwrite" else [1, 2, 3])


def test_deliver_returns_only_after_the_written_segment_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "_speedups", None)  # the Python path, whose system calls can be watched
    events: list[str] = []
    pwrite, fdatasync = os.pwrite, os.fdatasync
    monkeypatch.setattr(segments.os, "pwrite", lambda fd, data, at: events.append("pwrite") or pwrite(fd, data, at))
    monkeypatch.setattr(segments.os, "fdatasync", lambda fd: events.append("fdatasync") or fdatasync(fd))

    async def main() -> None:
        sink = StoreSink(tmp_path / "messages", segment_bytes=64 * 1024)
        await sink.start()
        events.clear()
        await sink.deliver([rec(1, a=1), rec(2, a=2)])
        assert events == ["pwrite", "pwrite", "fdatasync"]  # the batch, the zeros ahead of it, one sync
        events.clear()
        await sink.deliver([rec(3, a=3)])
        assert events == ["pwrite", "fdatasync"]  # then one write and one sync per batch
        events.append("returned")
        await sink.close()

    asyncio.run(main())
    [segment] = (tmp_path / "messages").glob("*.log")
    assert segment.name == "00000000000000000001.log"
    assert segment.stat().st_size == 64 * 1024  # preallocated: appending never grows the file
    assert segment.stat().st_blocks * 512 >= 64 * 1024


def test_the_c_durable_append_reports_a_failing_write_and_the_store_recovers(tmp_path: Path) -> None:
    """The C path (one flock .. fdatasync sequence): a write the kernel refuses is an OSError, not an
    acknowledgement; the writer forgets its position and the next batch goes to the right place."""
    assert segments._speedups is not None
    path = tmp_path / "messages"

    async def main() -> None:
        sink = StoreSink(path)
        await sink.start()
        await sink.deliver([rec(1, a=1)])
        writer = sink._log
        assert writer._fd is not None
        good = writer._fd
        writer._fd = os.open(next(path.glob("*.log")), os.O_RDONLY)  # pwrite now fails: EBADF
        os.close(good)
        with pytest.raises(RetriableSinkError, match="embedded store write failed"):
            await sink.deliver([rec(2, a=2)])
        assert sink.health()["status"] == "down"
        assert writer._fd is None  # forgotten: re-read from disk before the next write
        assert await sink.deliver([rec(3, a=3), rec(4, a=4)]) == [Outcome.DELIVERED] * 2
        assert sink.health()["status"] == "up"
        await sink.close()

    asyncio.run(main())
    assert [(r["seq"], r["ts"]) for r in read_messages(path)] == [(1, 1), (2, 3), (3, 4)]


def test_the_c_durable_append_steps_aside_when_another_writer_moved_the_tail(tmp_path: Path) -> None:
    assert segments._speedups is not None
    one, two = segments.SegmentWriter(tmp_path, 4096), segments.SegmentWriter(tmp_path, 4096)
    one.open()
    two.open()
    assert one.append([b'{"n":1}']) == 1
    tail = one._cursor.offset
    data = b"x" * 40
    assert two.append([b'{"n":2}']) == 2  # two caught up over one's entry and wrote at the old tail
    assert segments._speedups.append_durably(one._lock_fd, one._fd, data, tail) is False  # nothing written
    assert one.append([b'{"n":3}']) == 3  # the locked path catches up, then writes after two's entry
    one.close()
    two.close()
    assert [p for _, p in segments.read_log(tmp_path)] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']


def test_attribute_store_memory_is_bounded_and_answers_stay_right(tmp_path: Path) -> None:
    """Every device read was cached for good (~450 bytes each, attribute-less devices too): a fleet's worth.
    Now the oldest scopes go, and SQLite, written through, answers them again."""
    store = AttributeStore(tmp_path / "a.db", cache_max_scopes=4)
    for n in range(10):
        store.update(f"d{n}", CLIENT, {"n": n})
        assert store.request(f"nobody{n}", None, None) == {}  # two scopes of a device with no attributes
        assert len(store._cache) <= 4
    for n in range(10):  # evicted long ago: read back from SQLite
        assert store.request(f"d{n}", ["n"], None) == {"client": {"n": n}}
        store.update(f"d{n}", SHARED, {"s": n})
        store.delete(f"d{n}", CLIENT, ["n"])
        assert len(store._cache) <= 4
    assert [store.request(f"d{n}", None, None) for n in range(10)] == [{"shared": {"s": n}} for n in range(10)]
    store.close()


def test_attribute_store_answers_like_thingsboard_and_persists(tmp_path: Path) -> None:
    store = AttributeStore(tmp_path / "a.db")
    assert store.request("d", None, None) == {}
    store.update("d", CLIENT, {"fw": "1.0", "n": 3})
    store.update("d", SHARED, {"interval": 10, "mode": "eco"})
    assert store.request("d", None, None) == {
        "client": {"fw": "1.0", "n": 3},
        "shared": {"interval": 10, "mode": "eco"},
    }
    assert store.request("d", ["fw", "missing"], None) == {"client": {"fw": "1.0"}}
    assert store.request("d", None, ["mode"]) == {"shared": {"mode": "eco"}}
    assert store.request("d", ["missing"], ["missing"]) == {}
    assert store.delete("d", SHARED, ["mode", "ghost"]) == ["mode"]
    store.close()
    again = AttributeStore(tmp_path / "a.db")
    assert again.request("d", None, None) == {"client": {"fw": "1.0", "n": 3}, "shared": {"interval": 10}}
    again.forget_device("d")
    assert again.request("d", None, None) == {}
    assert sqlite3.connect(tmp_path / "a.db").execute("SELECT count(*) FROM attributes").fetchone()[0] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    names=st.tuples(st.text(), st.text(), st.text()),
    kind=st.sampled_from(RecordKind),
    transport=st.sampled_from(Transport),
    ts=st.integers(0, 2**53),
    received_at=st.integers(0, 2**53),
    values=st.dictionaries(st.text(), json_values, max_size=4),
)
def test_stored_bytes_are_exactly_the_documented_json(
    names: tuple[str, str, str],
    kind: RecordKind,
    transport: Transport,
    ts: int,
    received_at: int,
    values: dict[str, Any],
) -> None:
    sink = StoreSink(Path("unused"))
    record = Record(DeviceIdentity(*names), kind, ts, values, transport, received_at)
    expected = orjson.dumps(record.to_dict())
    assert sink._encode(record) == expected
    assert sink._encode(record) == expected  # again, from the cached template
    other = Record(DeviceIdentity(*names), kind, ts, values, transport, received_at)  # equal, another object
    assert StoreSink(Path("unused")).encode([record, record, other, record]) == [expected] * 4  # the C batch


def test_templates_stay_right_across_many_devices_sinks_and_cleared_caches() -> None:
    """The C encoder remembers templates by object address (more devices than it has slots here); a device
    freed and another made in its place, or a sink's cleared dict, never yields another device's line."""
    kinds, transports = list(RecordKind), [Transport.MQTT, Transport.HTTP, Transport.COAP]
    for round_ in range(3):
        devices = [DeviceIdentity(f"id-{round_}-{n}", f"dev-{round_}-{n}", f"t{n % 3}") for n in range(1500)]
        records = [
            Record(device, kinds[n % len(kinds)], n, {"v": n}, transports[n % 3], 1000 + n)
            for n, device in enumerate(devices)
        ]
        expected = [orjson.dumps(record.to_dict()) for record in records]
        sink = StoreSink(Path("unused"))
        assert sink.encode(records) == expected  # templates made
        assert sink.encode(records) == expected  # from them
        sink._templates.clear()
        assert sink.encode(list(reversed(records))) == list(reversed(expected))
        del devices, records, sink  # the next round's identities may take these addresses


@pytest.mark.parametrize("ts", [-1, 0, 2**63 - 1, -(2**63), 2**63, 2**64 - 1])  # as far as JSON goes (orjson)
def test_every_integer_timestamp_is_encoded_exactly(ts: int) -> None:
    """Within 64 signed bits the C fast path joins the line, beyond them the Python format does."""
    sink = StoreSink(Path("unused"))
    record = Record(DEV, RecordKind.TELEMETRY, ts, {"a": 1}, Transport.HTTP, ts)
    assert sink._encode(record) == orjson.dumps(record.to_dict())
    assert sink.encode([record, record]) == [orjson.dumps(record.to_dict())] * 2


def test_batch_encoding_takes_the_template_of_the_same_identity_only() -> None:
    """The C batch encoder keys templates by the identity object, as _encode does: a device renamed under
    the same id (a new DeviceIdentity) gets its own line, never the old name's."""
    sink = StoreSink(Path("unused"))
    before = Record(DeviceIdentity("id-1", "old-name"), RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2)
    after = Record(DeviceIdentity("id-1", "new-name"), RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2)
    attrs = Record(before.device, RecordKind.ATTRIBUTES, 1, {"a": 1}, Transport.MQTT, 2)
    batch = [before, before, after, after, attrs, before, attrs]
    assert sink.encode(batch) == [orjson.dumps(r.to_dict()) for r in batch]
    assert sink.encode(batch) == [orjson.dumps(r.to_dict()) for r in batch]  # all cached now


def test_batch_encoding_raises_what_the_record_encoder_raises() -> None:
    sink = StoreSink(Path("unused"))
    good = Record(DEV, RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2)
    bad = Record(DEV, RecordKind.TELEMETRY, 1, {"a": object()}, Transport.MQTT, 2)
    sink.encode([good])  # the template is cached: the C path meets the bad record
    with pytest.raises(orjson.JSONEncodeError):
        sink.encode([good, bad, good])


def test_an_odd_timestamp_type_is_encoded_faithfully_not_truncated() -> None:
    sink = StoreSink(Path("unused"))
    odd = Record(DEV, RecordKind.TELEMETRY, 1.5, {}, Transport.HTTP, 2)  # type: ignore[arg-type]
    assert orjson.loads(sink._encode(odd))["ts"] == 1.5


def test_poll_answers_finished_writes_in_order_without_waiting_for_the_loop(tmp_path: Path) -> None:
    """A transport's read may settle what the writer finished; the loop's own scheduled call is then a no-op."""

    async def main() -> None:
        sink = StoreSink(tmp_path / "messages")
        await sink.start()
        answers: list[Any] = []

        def first(outcomes: Any) -> None:
            answers.append(("first", outcomes))
            sink.poll()  # re-entered from a callback (a transport reading): must not run "second" inside "first"
            answers.append("first returned")

        sink.deliver_then([rec(1, n=1)], first)
        sink.deliver_then([rec(2, n=2), rec(3, n=3)], lambda outcomes: answers.append(("second", outcomes)))
        deadline = time.monotonic() + 5
        while len(sink._finished) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251 -- blocks the loop on purpose: only poll can answer
        sink.poll()
        assert answers == [
            ("first", [Outcome.DELIVERED]),
            "first returned",
            ("second", [Outcome.DELIVERED] * 2),
        ]
        await asyncio.sleep(0.01)  # the writer's own scheduled polls find nothing left
        assert len(answers) == 3
        await sink.close()

    asyncio.run(main())
    assert [r["values"]["n"] for r in read_messages(tmp_path / "messages")] == [1, 2, 3]


def test_the_c_poller_drains_only_when_something_finished() -> None:
    """StoreSink.poll in C (_speedups.Poller): the usual read finds nothing and costs no Python frame."""
    speedups = pytest.importorskip("tb_gateway._speedups")
    finished: deque[int] = deque()
    drained: list[int] = []
    poll = speedups.Poller(finished, lambda: drained.append(len(finished)))
    assert poll() is None
    assert drained == []
    finished.append(1)
    poll()
    assert drained == [1]
    with pytest.raises(TypeError):
        poll(1)
    with pytest.raises(TypeError):
        speedups.Poller(finished)


def test_retention_is_checked_in_the_background_and_configured_from_settings(tmp_path: Path) -> None:
    """A quiet log still ages out: ``run`` checks now and then, not only at roll-overs (docs/records.md)."""
    from tb_gateway.app import build_sink
    from tb_gateway.config import Settings
    from tb_gateway.metrics import Metrics

    metrics = Metrics()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, kafka_enabled=False, data_dir=tmp_path, store_max_bytes=5_000_000_000, store_retention_hours=0.5
    )
    configured = build_sink(settings, metrics)
    assert isinstance(configured, StoreSink)
    assert (configured._log.max_bytes, configured._log.max_age_s) == (5_000_000_000, 1800)
    assert not StoreSink(tmp_path / "other")._log.max_age_s  # the class's own default: keep everything

    path = tmp_path / "messages"
    removals = metrics.store_segments_removed
    sink = StoreSink(
        path, 1024, max_age_s=1800, check_every_s=0.01, on_removed=lambda why: removals.labels(reason=why).inc()
    )

    async def main() -> None:
        await sink.start()
        for ts in range(30):
            await sink.deliver([rec(ts, pad="x" * 100), rec(ts, pad="y" * 100)])
        listed = segments.segments(path)
        assert len(listed) > 3
        for _, old in listed[:2]:
            os.utime(old, (time.time() - 3600, time.time() - 3600))
        runner = asyncio.create_task(sink.run())
        async with asyncio.timeout(5):
            while len(segments.segments(path)) > len(listed) - 2:  # noqa: ASYNC110 - nothing to wait on
                await asyncio.sleep(0.01)
        await sink.close()
        await asyncio.wait_for(runner, 1)  # closed: the checks end by themselves
        assert [first for first, _ in segments.segments(path)] == [first for first, _ in listed[2:]]

    asyncio.run(main())
    assert metrics.store_segments_removed.labels(reason="age")._value.get() == 2


def test_batch_encoding_refuses_a_batch_changed_while_it_is_encoded() -> None:
    """The C loop calls the Python encoder for records it has no template for; a batch that shrank under
    it is refused, never read past its end."""
    sink = StoreSink(Path("unused"))
    batch = [
        Record(DeviceIdentity(f"id{n}", f"dev{n}"), RecordKind.TELEMETRY, 1, {"n": n}, Transport.MQTT, 2)
        for n in range(4)
    ]
    encode = sink._encode

    def shrinking(record: Record) -> bytes:
        batch.clear()
        return encode(record)

    sink._encode = shrinking  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="changed"):
        sink.encode(batch)
