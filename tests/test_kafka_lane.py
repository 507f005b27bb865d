"""The Kafka sink's C per-record work (``_kafka_lane.c``) against the Python it replaces (sinks/kafka_records.py,
sinks/kafka.py's ``_Batch``): the same bytes for any record, the same settling of a batch."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks import kafka_records
from tb_gateway.sinks.base import Outcome

try:
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - built without a C compiler
    _speedups = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")

# strings orjson writes escaped (quotes, backslashes, control characters), multi-byte UTF-8, and plain ones
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", "dev-1", 'q"uote\\back', "\x00\x01\x08\x09\x0a\x0c\x0d\x1f\x7f", "é€😀", "x" * 300]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MILLIS = st.integers(-(2**63), 2**63 - 1)


def record(name: str, id_: str, type_: str, kind: RecordKind, ts: int, values: Any, transport: Transport) -> Record:
    device = DeviceIdentity(id=id_, name=name, type=type_, token="t")
    return Record(device, kind, ts, values, transport, ts // 2)


@settings(max_examples=400, deadline=None)
@given(TEXT, TEXT, TEXT, st.sampled_from(RecordKind), MILLIS, st.dictionaries(TEXT, JSON, max_size=6),
       st.sampled_from(Transport))  # fmt: skip
def test_encode_gives_the_python_encoders_bytes(
    name: str, id_: str, type_: str, kind: RecordKind, ts: int, values: dict[str, Any], transport: Transport
) -> None:
    rec = record(name, id_, type_, kind, ts, values, transport)
    assert _speedups.kafka_encode(rec) == kafka_records.encode(rec)


def test_message_ids_longer_than_one_blake2b_block_match_hashlib() -> None:
    """Contents of 0..400 bytes cross the 128-byte block boundaries (exactly 128 and 256 included)."""
    for size in range(0, 400):
        rec = record("n", "i", "t", RecordKind.TELEMETRY, 1, {"k": "x" * size}, Transport.HTTP)
        key, value, headers = _speedups.kafka_encode(rec) or (b"", b"", [])
        content = orjson.dumps(["i", "telemetry", 1, 0, "http", {"k": "x" * size}])
        assert dict(headers)["tb-msg-id"] == hashlib.blake2b(content, digest_size=16).hexdigest().encode()
        assert (key, value) == kafka_records.encode(rec)[:2]


@pytest.mark.parametrize(
    "change",
    [
        {"ts": 2**63},  # orjson takes it (up to 2**64 - 1); the C writer only 64-bit signed: Python does it
        {"ts": True},  # a bool is an int, but orjson writes `true`
        {"received_at": 1.5},
        {"values": [("not", "a dict")]},
    ],
)
def test_unusual_records_are_left_to_python(change: dict[str, Any]) -> None:
    rec = record("n", "i", "t", RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT)
    for field, value in change.items():
        setattr(rec, field, value)
    assert _speedups.kafka_encode(rec) is None


def test_a_device_name_that_is_not_a_str_is_left_to_python() -> None:
    rec = record("n", "i", "t", RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT)
    rec.device = DeviceIdentity(id="i", name=7, type="t")  # type: ignore[arg-type]
    assert _speedups.kafka_encode(rec) is None


def test_a_lone_surrogate_is_left_to_python() -> None:
    rec = record("bad\ud800", "i", "t", RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT)
    assert _speedups.kafka_encode(rec) is None


class Latency:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, seconds: float) -> None:
        self.seen.append(seconds)


def test_a_batch_resolves_once_every_record_is_settled_and_asks_about_failures() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        asked: list[tuple[int, Any, Any]] = []

        def on_error(index: int, err: Any, msg: Any) -> Outcome:
            asked.append((index, err, msg))
            return Outcome.REJECTED

        def resolve(future: asyncio.Future[None]) -> None:
            future.set_result(None)

        latency = Latency()
        future: asyncio.Future[None] = loop.create_future()
        outcomes = [Outcome.SINK_FAILED] * 3
        batch = _speedups.KafkaBatch(loop, resolve, future, outcomes, Outcome.DELIVERED, latency, on_error)
        reports: list[Any] = []

        def produce(topic: str, value: bytes, key: bytes, *, headers: Any, on_delivery: Any) -> None:
            if key == b"full":
                raise BufferError("queue full")
            reports.append(on_delivery)

        records = [
            record("a", "a", "t", RecordKind.TELEMETRY, 1, {"v": 1}, Transport.MQTT),
            record("b", "full", "t", RecordKind.TELEMETRY, 1, {"v": 2}, Transport.MQTT),
            record("c", "c", "t", RecordKind.TELEMETRY, 1, {"v": 3}, Transport.MQTT),
        ]
        refused = _speedups.kafka_produce(produce, records, ["t"] * 3, batch, kafka_records.encode, (BufferError,))
        assert [(index, type(exc)) for index, exc in refused] == [(1, BufferError)]
        assert len(reports) == 2 and batch.remaining == 3
        batch.settle(1, Outcome.SINK_FAILED)
        reports[0](None, "msg-a")
        assert batch.remaining == 1 and not future.done()
        reports[1]("broker said no", "msg-c")
        assert batch.remaining == 0
        await asyncio.wait_for(future, 1)
        assert outcomes == [Outcome.DELIVERED, Outcome.SINK_FAILED, Outcome.REJECTED]
        assert asked == [(2, "broker said no", "msg-c")]
        assert len(latency.seen) == 1 and 0 <= latency.seen[0] < 5

    asyncio.run(body())


def test_other_exceptions_from_produce_propagate() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        batch = _speedups.KafkaBatch(loop, print, loop.create_future(), [None], "ok", None, print)

        def produce(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug")

        rec = record("a", "a", "t", RecordKind.TELEMETRY, 1, {"v": 1}, Transport.MQTT)
        with pytest.raises(RuntimeError, match="bug"):
            _speedups.kafka_produce(produce, [rec], ["t"], batch, kafka_records.encode, (BufferError,))

    asyncio.run(body())


def test_python_encoding_is_used_for_what_c_leaves() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        batch = _speedups.KafkaBatch(loop, print, loop.create_future(), [None], "ok", None, print)
        sent: list[bytes] = []

        def produce(topic: str, value: bytes, key: bytes, *, headers: Any, on_delivery: Any) -> None:
            sent.append(value)

        rec = record("a", "a", "t", RecordKind.TELEMETRY, 2**63, {"v": 1}, Transport.MQTT)
        assert _speedups.kafka_produce(produce, [rec], ["t"], batch, kafka_records.encode, (BufferError,)) == []
        assert sent == [kafka_records.encode(rec)[1]]
        assert orjson.loads(sent[0])["ts"] == 2**63

    asyncio.run(body())
