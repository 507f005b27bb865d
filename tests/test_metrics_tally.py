"""Metrics.count_sent: the C tally of a delivered batch agrees with the Python one, device-state records aside."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway import metrics as metrics_module
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome

DEVICE = DeviceIdentity("id-1", "dev-1")


def sent(m: Metrics) -> dict[str, float]:
    return {key[0]: child.value for key, child in m.messages_sent._children.items() if child.value}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(RecordKind), st.sampled_from(Transport)), max_size=60))
def test_c_tally_equals_the_python_tally(pairs: list[tuple[RecordKind, Transport]]) -> None:
    records = [Record(DEVICE, kind, 1, {"a": 1}, transport, 2) for kind, transport in pairs]
    assert metrics_module._sent_by_transport is not None, "the C extension is built in this environment"
    in_c = Metrics._sent_by_transport(records)
    in_python = Metrics._sent_by_transport(tuple(records))  # not a list: the Python tally
    assert in_c == in_python
    expected: dict[Transport, int] = {}
    for kind, transport in pairs:
        if kind is not RecordKind.DEVICE_STATE:
            expected[transport] = expected.get(transport, 0) + 1
    assert dict(in_c) == expected


def test_count_sent_counts_delivered_records_by_transport_and_failures_by_outcome() -> None:
    m = Metrics()
    batch: list[Any] = [
        Record(DEVICE, RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2),
        Record(DEVICE, RecordKind.DEVICE_STATE, 1, {"a": 1}, Transport.MQTT, 2),
        Record(DEVICE, RecordKind.ATTRIBUTES, 1, {"a": 1}, Transport.HTTP, 2),
        Record(DEVICE, RecordKind.TELEMETRY, 1, {"a": 1}, Transport.MQTT, 2),
    ]
    m.count_sent(batch, [Outcome.DELIVERED] * 4)
    assert sent(m) == {"mqtt": 2, "http": 1}
    m.count_sent(batch, [Outcome.DELIVERED, Outcome.DELIVERED, Outcome.REJECTED, Outcome.SPOOL_FULL])
    assert sent(m) == {"mqtt": 3, "http": 1}
    for outcome in ("rejected", "spool_full"):
        assert m.records_failed.labels(outcome=outcome)._value.get() == 1
