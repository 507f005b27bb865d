"""The C ``Ingest`` (``_lanes.c``) that stands in for ``DeviceApi.post``, against ``DeviceApi._post``, the reference.

For any message (kind, payload, transport, read time, whether the transport already reported activity) and
any pipeline state (running with a callback or a plain sink, closing, full, a rate limit), both must answer the same (an
outcome, a ticket or the same PayloadError), queue the same records with the same tickets, count the same
and leave the device in the same state. The HTTP fast lane (FastConnection) is checked against httptools'
general path in test_http_fast.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.device_api import DeviceApi
from tb_gateway.downlink.hub import Downlink
from tb_gateway.errors import PayloadError
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tests.support import CallbackMemorySink, MemorySink, make_api

_speedups: Any
try:
    from tb_gateway import _speedups
except ImportError:  # built without a C compiler: post is _post
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")

DEVICE = DeviceIdentity("id-dev1", "dev1")
NOW = 1_700_000_000_000

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["42", "-1.5", ".5", "1e3", "0x10", " 7", "٣"]),  # strings type cast may turn into numbers
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.text(max_size=6), values, max_size=5)
timestamps = st.one_of(st.integers(-5, 2**63), st.sampled_from(["1700000000000", "-1", "1.5", "x", None]))
flat = st.dictionaries(st.text(min_size=1, max_size=6), scalars, min_size=1, max_size=4)  # the everyday message
documents = st.one_of(
    flat,
    st.fixed_dictionaries({"ts": st.integers(0, 2**42), "values": flat}),
    objects,
    st.lists(objects, max_size=3),
    st.lists(st.fixed_dictionaries({"ts": timestamps, "values": objects}), max_size=3),
    st.fixed_dictionaries({"ts": timestamps, "values": objects}),
    values,
)
raw = st.sampled_from(
    [
        b"",
        b"  ",
        b"{",
        b'{"a": 1e400}',
        b'{"a": 0.12345678901234567890}',
        b'{"a": "\\ud800"}',
        b'{"a": 1, "a": 2}',
        b"[" * 300 + b"]" * 300,
        b'{"ts": 1, "values": {}}',
        b"\xff\xfe",
        b'{"secretKey": "s", "durationMs": 5}',
    ]
)
payloads = st.one_of(documents.map(lambda d: json.dumps(d).encode()), raw)


def _api(
    tmp: Path, *, plain_sink: bool = False, limited: bool = False, max_queue: int = 1000, downlink: bool = True
) -> DeviceApi:
    limits = {"rate_limit_enabled": True, "rate_limit_device_telemetry_messages": "2:60"} if limited else {}
    sink = MemorySink() if plain_sink else CallbackMemorySink()
    # the read time when the transport gives none: the same both ways
    api = make_api(tmp, sink, queue_max_records=max_queue, clock_ms=lambda: NOW, **limits)
    if downlink:
        api.downlink = Downlink(
            api.attributes,
            api.metrics,
            submit=api.pipeline.submit,
            session_limits=api.session_limits,
            instance="t",
            clock_ms=lambda: NOW,
        )
    return api


def _state(api: DeviceApi, answer: Any) -> dict[str, Any]:
    registry = api.metrics.registry
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if metric.name.startswith(("tb_gateway_messages_received", "tb_gateway_refusals", "tb_gateway_rate_limited"))
        and not sample.name.endswith("_created")
    }
    device = api.downlink._states.get(DEVICE.id) if api.downlink is not None else None
    pipeline = api.pipeline
    if isinstance(answer, asyncio.Future):
        answer = ("ticket", answer.pending, answer.outcome, answer.done())  # type: ignore[attr-defined]
    return {
        "answer": answer,
        "queued": [(r.device, r.kind, r.ts, r.values, r.transport, r.received_at) for r in pipeline._queue],
        "tickets": [(t.pending, t.outcome) for t in pipeline._tickets],
        "woken": pipeline._wakeup.is_set(),  # a plain sink's batching task (Kafka): submit wakes it
        "counted": samples,
        "device": None if device is None else (device.active, device.last_activity),
    }


async def _post(api: DeviceApi, message: tuple[Any, ...], activity_seen: bool, reference: bool) -> dict[str, Any]:
    kind, payload, transport, now = message
    post = api._post if reference else api.post
    try:
        answer: Any = post(DEVICE, kind, payload, transport, now, activity_seen=activity_seen)
    except PayloadError as exc:
        answer = ("PayloadError", str(exc))
    return _state(api, answer)


def _both(setup: dict[str, Any], messages: list[tuple[Any, ...]], activity_seen: bool, before: Any = None) -> None:
    async def main() -> None:
        seen = []
        for reference in (False, True):
            with tempfile.TemporaryDirectory() as scratch:
                api = _api(Path(scratch), **setup)
                assert reference or type(api.post) is _speedups.Ingest
                if before is not None:
                    before(api)
                seen.append([await _post(api, message, activity_seen, reference) for message in messages])
                api.attributes.close()
        assert seen[0] == seen[1]

    asyncio.run(main())


messages = st.tuples(
    st.sampled_from([RecordKind.TELEMETRY, RecordKind.TELEMETRY, RecordKind.ATTRIBUTES, RecordKind.CLAIM]),
    payloads,
    st.sampled_from([Transport.HTTP, Transport.COAP, Transport.MQTT]),
    st.sampled_from([None, NOW + 5]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.booleans(), st.booleans(), st.booleans())
def test_ingest_answers_queues_and_counts_as_the_python_post(
    batch: list[tuple[Any, ...]], activity_seen: bool, with_downlink: bool, plain_sink: bool
) -> None:
    _both({"downlink": with_downlink, "plain_sink": plain_sink}, batch, activity_seen)


@settings(max_examples=60, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.sampled_from(["closing", "full", "rate limit"]))
def test_ingest_hands_every_other_pipeline_state_to_the_python_post(batch: list[tuple[Any, ...]], state: str) -> None:
    setup: dict[str, Any] = {
        "full": {"max_queue": 1},
        "rate limit": {"limited": True},
    }.get(state, {})
    before = (lambda api: api.pipeline.close()) if state == "closing" else None
    _both(setup, batch, False, before)


def test_the_common_message_is_taken_in_c_and_a_device_seen_before_stays_active(tmp_path: Path) -> None:
    """The everyday case, spelled out: one record queued behind one ticket, counted once, the device active."""

    async def main() -> None:
        api = _api(tmp_path)
        assert api.downlink is not None
        calls: list[Any] = []
        activity = api.downlink.activity
        api.downlink.activity = lambda *args: (calls.append(args), activity(*args))[1]  # type: ignore[method-assign]
        first = api.post(DEVICE, RecordKind.TELEMETRY, b'{"t":21.5,"on":true}', Transport.HTTP, NOW)
        second = api.post(DEVICE, RecordKind.TELEMETRY, b'{"t":22}', Transport.HTTP, NOW + 1)
        assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
        assert len(calls) == 1  # the first message makes the device active; the second only moves its time
        state = api.downlink._states[DEVICE.id]
        assert (state.active, state.last_activity) == (True, NOW + 1)
        queued = [(r.values, r.ts, r.received_at) for r in api.pipeline._queue if r.kind is RecordKind.TELEMETRY]
        assert queued == [({"t": 21.5, "on": True}, NOW, NOW), ({"t": 22}, NOW + 1, NOW + 1)]
        received = api.metrics.registry.get_sample_value("tb_gateway_messages_received_total", {"transport": "http"})
        assert received == 2
        api.attributes.close()

    asyncio.run(main())


def test_a_delivered_ticket_resolves_through_the_running_pipeline(tmp_path: Path) -> None:
    async def main() -> None:
        sink = CallbackMemorySink()
        api = make_api(tmp_path, sink)
        runner = asyncio.create_task(api.pipeline.run())
        try:
            answers = [api.post(DEVICE, RecordKind.TELEMETRY, b'{"n":%d}' % n, Transport.COAP) for n in range(5)]
            assert await asyncio.gather(*answers) == [Outcome.DELIVERED] * 5  # type: ignore[arg-type]
            assert [r.values for r in sink.records] == [{"n": n} for n in range(5)]
        finally:
            api.pipeline.close()
            await runner
            api.attributes.close()

    asyncio.run(main())


WITHOUT_C = """
import asyncio, sys
from pathlib import Path
sys.modules["tb_gateway._speedups"] = None  # as if built without a C compiler: every import of it fails
from tb_gateway.mqtt.packets import Publish
from tests.http_support import Raw, request, serving
from tests.mqtt_support import Client, mqtt_gateway

async def main() -> None:
    async with serving(Path(sys.argv[1]), tokens={"T1": "dev1"}) as gw:
        assert gw.api.post == gw.api._post and gw.server.lane is None
        raw = await Raw.connect(gw.port)
        for n in range(3):
            await raw.send(request("POST", "/api/v1/T1/telemetry", b'{"n": %d}' % n))
            assert (await raw.response())[0] == 200
        await raw.send(request("POST", "/api/v1/T1/telemetry", b"{oops"))
        assert (await raw.response())[0] == 400
        await raw.close()
        assert [r.values for r in gw.sink.records] == [{"n": 0}, {"n": 1}, {"n": 2}]
    async with mqtt_gateway(Path(sys.argv[1]) / "mqtt") as env:
        assert env.server.lane is None
        client = await Client.connected(env.port, version=5)
        await client.send(*(Publish("v1/devices/me/telemetry", b'{"m": %d}' % n, 1, n + 1) for n in range(3)))
        await client.send(Publish("v1/devices/me/telemetry", b"{oops", 1, 9))
        assert [(a.packet_id, a.reason_code) for a in await client.recv_n(4)] == [(1, 0), (2, 0), (3, 0), (9, 0x99)]
        await client.close()
        assert [r.values for r in env.sink.records] == [{"m": 0}, {"m": 1}, {"m": 2}]

asyncio.run(main())
print("served")
"""


def test_without_the_c_extension_the_python_paths_serve(tmp_path: Path) -> None:
    """A build without a C compiler: DeviceApi.post is _post, HttpConnection reads everything with httptools,
    MqttConnection everything with its Python session (no lane)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", WITHOUT_C, str(tmp_path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'src'}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "served", done.stderr


def test_the_http_lane_counts_each_answer_in_the_latency_histogram(tmp_path: Path) -> None:
    """The 200s the lane writes itself are observed as the general path observes its own (buckets, count,
    sum), in C."""
    from tests.http_support import Raw, request, serving

    async def main() -> None:
        async with serving(tmp_path, tokens={"T1": "dev1"}) as gw:
            raw = await Raw.connect(gw.port)
            for n in range(20):
                await raw.send(request("POST", "/api/v1/T1/telemetry", b'{"n": %d}' % n))
                assert (await raw.response())[0] == 200
            await raw.close()
            assert gw.server.lane is not None and gw.server.lane.taken == 19  # the first filled the auth cache
            child = gw.api.metrics.ack_latency.labels(transport="http")
            assert child.count == 20 and sum(child.buckets) == 20
            assert 0 < child.sum < 20 * 5.0
            below = [sum(child.buckets[: i + 1]) for i in range(len(child.buckets))]
            assert below[-1] == 20 and below == sorted(below)

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(0, 20, allow_nan=False), st.sampled_from([0.0005, 0.001, 0.5, 10.0, 10.5])), max_size=30
    )
)
def test_the_lanes_observe_a_latency_as_the_histogram_child_does(values: list[float]) -> None:
    from tb_gateway.fastmetrics import HistogramChild
    from tb_gateway.metrics import LATENCY_BUCKETS

    bounds = sorted(LATENCY_BUCKETS)
    in_c, in_python = HistogramChild(bounds), HistogramChild(bounds)
    for value in values:
        _speedups.observe(in_c, value)
        in_python.observe(value)
    assert (in_c.buckets, in_c.count, in_c.sum) == (in_python.buckets, in_python.count, in_python.sum)
