"""The MQTT lane (``_mqtt_lane.c``) against the general path (``MqttConnection._read`` / ``_settle``).

The lane may decline any read (the connection then reads it the general way), but what it takes must end as
the general path would end it: the same bytes written, records, counters, session and connection state.
Each scenario is served twice in process, over a transport the test plays, once with the server's lane and
once without it (``server.lane = None``: every read and every settled answer takes the Python path).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_gateway.downlink.hub import Downlink
from tb_gateway.mqtt.codec import Decoder, encode
from tb_gateway.mqtt.packets import MQTT_5, Connect, Publish
from tb_gateway.mqtt.server import MqttConnection, MqttServer
from tb_gateway.mqtt.topics import FIXED, Action
from tests.support import CallbackMemorySink, make_api

_speedups: Any
try:
    from tb_gateway import _speedups
except ImportError:  # built without a C compiler: there is no lane to check
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")

NOW_MS = 1_750_000_000_000
POSTING = sorted(topic for topic, target in FIXED.items() if target.action is Action.POST)
PAYLOADS = [
    b'{"t":1}',
    b'{"a":"x","b":2.5,"c":true}',
    b'[{"ts":1700000000000,"values":{"k":1}},{"ts":1700000000001,"values":{"k":2}}]',
    b'{"ts":"1700000000000","values":{"k":3}}',
    b"{}",  # nothing to store: answered at once
    b'{"t":',  # malformed: v5 PUBACK 0x99, 3.x close
    b"[1]",
    b'"text"',
    b"",
]


def publish(version: int, topic: str, payload: bytes, packet_id: int, first: int = 0x32, props: bytes = b"") -> bytes:
    """A PUBLISH as raw bytes (any first byte, v5 properties as given): what devices send, and what they get wrong."""
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if first & 0x06:
        body += packet_id.to_bytes(2, "big")
    if version == MQTT_5:
        body += bytes([len(props)]) + props
    body += payload
    size = len(body)
    length = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([first]) + bytes(length) + body


class Wire:
    """The transport: keeps what is written, plays pause/resume and close like asyncio's."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.protocol: MqttConnection | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed and self.protocol is not None:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class PassClock:
    """The connection's loop, with a time that moves only between loop passes the test plays: whether two reads
    fall in the same millisecond (uvloop's clock) must not depend on how fast the machine is."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = loop.time()

    def time(self) -> float:
        return self.now

    def next_pass(self) -> None:
        self.now = max(self.now + 0.001, self._loop.time())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def _until(condition: Any, wait_s: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


Read = tuple[bytes, bool, bool]  # the bytes; the sink held while it is read; the next read in the same loop pass


async def _serve(
    tmp_path: Path, version: int, reads: list[Read], *, lane: bool, downlink: bool, **config: Any
) -> dict[str, Any]:
    """Connect, then each read (with the sink held while its flag is set), then let everything settle.

    Right after the first read nothing can have settled yet, whatever the timing: what it left (reading
    paused or not, in flight, answers owed, closing) is compared too."""
    sink = CallbackMemorySink()
    ticks = itertools.count(NOW_MS)  # each reading of the clock a millisecond later: both paths read it alike
    api = make_api(tmp_path, sink, clock_ms=lambda: next(ticks), batch_timeout=0.002, **config)
    if downlink:
        api.downlink = Downlink.from_settings(api.settings, api.attributes, api.metrics, None, api.session_limits)
    server = MqttServer(api)
    if not lane:
        server.lane = None
    loop = asyncio.get_running_loop()
    runner = loop.create_task(api.pipeline.run())
    wire = Wire()
    clock = PassClock(loop)
    connection = MqttConnection(server, clock)  # type: ignore[arg-type]
    wire.protocol = connection
    try:
        connection.connection_made(wire)  # type: ignore[arg-type]
        connection.data_received(encode(Connect("", version, username="T1", keepalive_s=60), version))
        assert await _until(lambda: len(wire.written) > 0)
        clock.next_pass()
        first: tuple[Any, ...] = ()
        for data, hold, same_pass in reads:
            if not wire.reading:  # a paused transport delivers nothing: let the sink answer until it reads again
                sink.gate.set()
                await _until(lambda: wire.reading or wire.closed)
            if wire.closed:
                break
            if hold:
                sink.gate.clear()
            else:
                sink.gate.set()
            connection.data_received(data)
            if not first:
                first = (wire.reading, connection._session.inflight, len(connection._acks), connection._closing)
            if not same_pass:  # else the next read comes in this loop pass: the loop's time has not moved
                await asyncio.sleep(0)
                clock.next_pass()
        sink.gate.set()
        await _until(lambda: wire.closed or not connection._acks)
        await asyncio.sleep(0.01)
        session = connection._session
        state = {
            "written": Decoder(version=version).feed(bytes(wire.written)) if wire.written else [],
            "closed": wire.closed,
            "first": first,
            "records": [(r.kind.value, r.ts, r.values, r.received_at) for r in sink.records],
            "inflight": session.inflight,
            "paused": connection._paused,
            "closing": connection._closing,
            "acks": len(connection._acks),
            "received": api.metrics.registry.get_sample_value(
                "tb_gateway_messages_received_total", {"transport": "mqtt"}
            ),
            "refusals": {
                sample.labels["reason"]: sample.value
                for metric in api.metrics.registry.collect()
                if metric.name == "tb_gateway_refusals"
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.labels.get("transport") == "mqtt"
            },
            "latencies": api.metrics.registry.get_sample_value(  # one answer in LATENCY_SAMPLE is observed
                "tb_gateway_ack_latency_seconds_count", {"transport": "mqtt"}
            ),
            "active": None if api.downlink is None else api.downlink._states["id-dev1"].last_activity,
            "taken": 0 if server.lane is None else server.lane.taken,
        }
        if not wire.closed:
            connection.connection_lost(None)
        return state
    finally:
        api.pipeline.close()
        sink.gate.set()
        await runner
        api.attributes.close()


def _both(tmp_path: Path, version: int, reads: list[Read], **options: Any) -> dict[str, Any]:
    """Serve with and without the lane (on uvloop, as the gateway runs); they must agree on everything but how
    many reads the lane took."""
    served = []

    async def main() -> None:
        served.append(await _serve(tmp_path / "lane", version, reads, lane=True, **options))
        served.append(await _serve(tmp_path / "general", version, reads, lane=False, **options))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    fast, general = served
    assert general.pop("taken") == 0
    taken = fast.pop("taken")
    assert fast == general
    return {**fast, "taken": taken}


def test_the_lane_takes_the_everyday_reads_and_answers_them_as_the_general_path(tmp_path: Path) -> None:
    """One message per read and a pipelined run of them, on every version, with the downlink hub attached."""
    for version, downlink in ((3, True), (4, True), (MQTT_5, True), (4, False), (MQTT_5, False)):
        reads = [
            (publish(version, "v1/devices/me/telemetry", b'{"n":%d}' % n, n + 1), False, n % 2 == 0) for n in range(5)
        ]
        run = b"".join(publish(version, "v2/a", b'{"a":%d}' % n, 100 + n) for n in range(10))
        state = _both(tmp_path / f"{version}{downlink}", version, [*reads, (run, True, False)], downlink=downlink)
        assert state["taken"] == 6
        acks = [packet for packet in state["written"] if isinstance(packet, type(state["written"][-1]))]
        assert [packet.packet_id for packet in acks] == [1, 2, 3, 4, 5, *range(100, 110)]
        assert [values for _, _, values, _ in state["records"]] == [
            *({"n": n} for n in range(5)),
            *({"a": n} for n in range(10)),
        ]
        assert state["inflight"] == 0 and not state["closed"]
        assert state["active"] > NOW_MS if downlink else state["active"] is None


def test_a_bad_payload_in_a_run_is_refused_where_it_stands(tmp_path: Path) -> None:
    """v5: PUBACK 0x99 for it and the others delivered; 3.1.1: the earlier ones answered, then the close."""
    for version in (4, MQTT_5):
        run = b"".join(
            publish(version, "v1/devices/me/telemetry", payload, n + 1)
            for n, payload in enumerate([b'{"n":1}', b'{"n":', b'{"n":3}'])
        )
        state = _both(tmp_path / str(version), version, [(run, True, False)], downlink=False)
        assert state["taken"] == 1
        assert state["refusals"] == {"bad_payload": 1.0}
        written = state["written"]
        if version == MQTT_5:
            assert [(p.packet_id, p.reason_code) for p in written[1:]] == [(1, 0), (2, 0x99), (3, 0)]
            assert len(state["records"]) == 2 and not state["closed"]
        else:
            assert [p.packet_id for p in written[1:]] == [1] and state["closed"]


def test_the_lane_declines_what_it_does_not_know(tmp_path: Path) -> None:
    """Every read here has something only the general path handles: nothing is taken, all of it is served."""
    version = 4
    plain = publish(version, "v1/devices/me/telemetry", b'{"n":1}', 7)
    reads = [
        plain[:5],  # a partial packet: and the next read starts with its rest
        plain[5:] + plain.replace(b"\x00\x07", b"\x00\x08"),
        b"\xc0\x00",  # PINGREQ
        publish(version, "v1/devices/me/telemetry", b'{"q":0}', 0, first=0x30),  # QoS 0
        publish(version, "v1/devices/me/telemetry", b'{"d":1}', 9, first=0x3A),  # DUP
        publish(version, "v1/devices/me/attributes/request/1", b'{"clientKeys":"a"}', 10),
        publish(version, "v2/t/p", b"\x08\x01", 11),  # protobuf: refused
        publish(version, "nowhere", b"{}", 12),
        plain + b"\xc0\x00",  # a plain PUBLISH and something else in one read
    ]
    state = _both(tmp_path, version, [(data, False, False) for data in reads], downlink=True)
    assert state["taken"] == 0
    assert state["closed"]  # the protobuf payload closes a 3.1.1 connection


def test_a_full_window_or_pipeline_pauses_reading_as_the_general_path_does(tmp_path: Path) -> None:
    """The lane posts, then hands the pause to _flush: in-flight window of 3, a queue of 20 records."""
    version = MQTT_5
    reads = [
        (b"".join(publish(version, "v2/t", b'{"n":%d}' % (4 * r + n), 4 * r + n + 1) for n in range(4)), True, False)
        for r in range(8)
    ]
    state = _both(tmp_path, version, reads, downlink=False, mqtt_max_inflight=3, queue_max_records=20)
    assert state["taken"] > 0
    assert state["first"] == (False, 4, 4, False)  # the window is full: reading paused
    assert [values["n"] for _, _, values, _ in state["records"]] == list(range(32))


@st.composite
def packets(draw: st.DrawFn, version: int) -> bytes:
    kind = draw(st.sampled_from(["plain"] * 6 + ["qos0", "dup", "props", "unknown", "request", "ping", "junk"]))
    topic = draw(st.sampled_from(POSTING))
    payload = draw(st.sampled_from(PAYLOADS))
    packet_id = draw(st.integers(0, 65535) | st.integers(1, 40))
    if kind == "plain":
        return publish(version, topic, payload, packet_id)
    if kind == "qos0":
        return publish(version, topic, payload, 0, first=0x30)
    if kind == "dup":
        return publish(version, topic, payload, packet_id, first=0x3A)
    if kind == "props":
        return publish(version, topic, payload, packet_id, props=b"\x01\x01" if version == MQTT_5 else b"")
    if kind == "unknown":
        return publish(version, draw(st.sampled_from(["v1/devices/me/x", "v2/t/p", "a/b", ""])), payload, packet_id)
    if kind == "request":
        return publish(version, "v1/devices/me/attributes/request/3", b'{"sharedKeys":"s"}', packet_id)
    if kind == "ping":
        return b"\xc0\x00"
    return draw(st.binary(min_size=1, max_size=6))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Read], dict[str, Any]]:
    version = draw(st.sampled_from([3, 4, MQTT_5]))
    stream = [draw(st.lists(packets(version), min_size=1, max_size=4)) for _ in range(draw(st.integers(1, 6)))]
    reads = [b"".join(read) for read in stream]
    if draw(st.booleans()):  # cut the stream elsewhere: packets split across reads
        whole = b"".join(reads)
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=4)))
        reads = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True) if whole[a:b]]
    flags = [(draw(st.booleans()), draw(st.booleans())) for _ in reads]
    options: dict[str, Any] = {"downlink": draw(st.booleans())}
    if draw(st.booleans()):
        options.update(mqtt_max_inflight=draw(st.integers(1, 4)), queue_max_records=draw(st.integers(4, 30)))
    if draw(st.booleans()):
        options.update(rate_limit_enabled=True, rate_limit_device_telemetry_messages="3:60")
    return version, [(data, hold, same) for data, (hold, same) in zip(reads, flags, strict=True)], options


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_generated_reads_end_as_the_general_path_ends_them(
    tmp_path_factory: pytest.TempPathFactory, scenario: tuple[int, list[Read], dict[str, Any]]
) -> None:
    version, reads, options = scenario
    _both(tmp_path_factory.mktemp("lane"), version, reads, **options)


@pytest.fixture(scope="module")
def scanner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The lane of a server configured as the gateway configures it (its topics, packet size limit)."""

    async def make() -> Any:
        api = make_api(tmp_path_factory.mktemp("scanner"), CallbackMemorySink())
        api.attributes.close()
        return MqttServer(api).lane

    return asyncio.run(make())


def test_the_scanner_takes_only_whole_plain_publishes_on_posting_topics(scanner: Any) -> None:
    """What ``MqttLane.publishes`` counts: whole plain QoS 1 PUBLISHes on the topics that post, nothing else."""
    for version in (4, MQTT_5):
        v5 = version == MQTT_5
        run = b"".join(publish(version, topic, b"{}", n + 1) for n, topic in enumerate(POSTING))
        assert scanner.publishes(run, v5) == len(POSTING)
        assert scanner.publishes(run[:-1], v5) == 0
        assert scanner.publishes(run + b"\xc0\x00", v5) == 0
        assert scanner.publishes(publish(version, "v2/t", b"{}", 0), v5) == 0
        assert scanner.publishes(publish(version, "v2/t", b"x" * 65537, 1), v5) == 0  # over MAX_PAYLOAD_SIZE


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from([4, MQTT_5]), data=st.data())
def test_what_the_scanner_counts_the_decoder_reads_the_same(scanner: Any, version: int, data: st.DataObject) -> None:
    reads = data.draw(st.lists(packets(version), min_size=1, max_size=5))
    whole = b"".join(reads)
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(whole)))
        whole = whole[:at] + data.draw(st.binary(max_size=3)) + whole[at:]
    count = scanner.publishes(whole, version == MQTT_5)
    if count:
        decoder = Decoder(65536, version)
        decoded = decoder.feed(whole)
        assert len(decoded) == count and not decoder.buffered
        for packet in decoded:
            assert type(packet) is Publish and packet.qos == 1 and not packet.properties and not packet.dup
            assert packet.topic in POSTING and packet.packet_id and not packet.retain
