"""The CoAP server's C lane (``CoapLane``, ``_lanes.c``) against its Python path, the reference.

The same datagrams (common POSTs, duplicates, NONs, other routes and methods, unknown tokens, bad payloads,
oversized bodies, pings, malformed bytes), read at the same times and settled at the same points, must give
the same datagrams back, the same records, counters and endpoint state, whether the lane takes them or not.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.coap.codec import CON, NON, Code, Message, Option, encode, encode_uint
from tb_gateway.coap.endpoint import EndpointConfig, Exchange
from tb_gateway.coap.expiring import PeerWindowedMap
from tb_gateway.coap.server import EXCHANGE_FIELDS, CoapServer
from tb_gateway.records import Transport
from tests.support import PollOnlySink, make_api

_speedups: Any
try:
    from tb_gateway import _speedups
except ImportError:  # built without a C compiler: there is no lane
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")

TOKENS = {"TOKEN_A": "dev-a", "TOKEN_B": "dev-b"}
ADDRESSES = [("127.0.0.1", 40001), ("127.0.0.1", 40002), ("::1", 40003, 0, 0)]


class Socket:
    port = 0

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        self.sent.extend(datagrams)

    def close(self) -> None:
        pass


def _path(*segments: str) -> tuple[tuple[int, bytes], ...]:
    return tuple((Option.URI_PATH, s.encode()) for s in segments)


routes = st.sampled_from(
    [
        _path("api", "v1", "TOKEN_A", "telemetry"),
        _path("api", "v1", "TOKEN_A", "telemetry"),
        _path("api", "v1", "TOKEN_B", "attributes"),
        _path("api", "v1", "TOKEN_A", "claim"),
        _path("api", "v1", "NOPE", "telemetry"),
        _path("api", "v1", "telemetry"),
        _path("api", "v2", "TOKEN_A", "telemetry"),
        _path("api", "v1", "TOKEN_A", "rpc"),
        (*_path("api", "v1", "TOKEN_A", "telemetry"), (Option.CONTENT_FORMAT, encode_uint(50))),
        (*_path("api", "v1", "TOKEN_A", "telemetry"), (Option.CONTENT_FORMAT, b""), (Option.CONTENT_FORMAT, b"")),
        (*_path("api", "v1", "TOKEN_A", "telemetry"), (Option.URI_QUERY, b"x=1")),
        ((9, b"x"), *_path("api", "v1", "TOKEN_A", "telemetry")),  # an unknown critical option: 4.02
    ]
)
bodies = st.sampled_from(
    [b'{"t":21}', b'{"t":21,"on":true}', b"[1]", b"{oops", b"", b'{"ts":5,"values":{"a":1}}', b'{"a":"x"}', b"x" * 70]
)
messages = st.tuples(
    st.sampled_from([CON, CON, CON, NON]),
    st.sampled_from([Code.POST, Code.POST, Code.POST, Code.GET, Code.PUT, 0]),
    st.integers(0, 6),  # message id: small, so duplicates are common
    st.binary(max_size=2),  # token
    routes,
    bodies,
    st.integers(0, len(ADDRESSES) - 1),
)
steps = st.lists(
    st.one_of(
        st.lists(messages, min_size=1, max_size=6).map(lambda batch: ("read", batch)),
        st.just(("settle", None)),
        st.just(("malformed", None)),
    ),
    min_size=1,
    max_size=8,
)


def _datagram(message: tuple[Any, ...]) -> tuple[bytes, Any]:
    mtype, code, mid, token, options, body, address = message
    payload = b"" if code == 0 else body
    msg = Message(mtype, code, mid, b"" if code == 0 else token, () if code == 0 else options, payload)
    return encode(msg), ADDRESSES[address]


async def _run(
    steps_: list[tuple[str, Any]], lane: bool, window: int = 64, python_table: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        return await _run_in(Path(scratch), steps_, lane, window, python_table)


async def _run_in(
    tmp: Path, steps_: list[tuple[str, Any]], lane: bool, window: int, python_table: bool = False
) -> dict[str, Any]:
    sink = PollOnlySink()
    api = make_api(tmp, sink, TOKENS, max_payload_size=64, clock_ms=lambda: 1_700_000_000_000)
    # four de-duplication entries at most, ``window`` per peer: the oldest go first, and the expiry queues
    # are compacted often
    config = EndpointConfig(max_body_bytes=64, max_exchanges=4, exchanges_per_peer=window)
    server = CoapServer(api, host="127.0.0.1", port=0, config=config)
    server.endpoint._next_mid = 1000  # separate responses' message ids: the same both ways
    server._loop = asyncio.get_running_loop()
    sock = Socket()
    server._socket = sock
    if not lane:
        server._lane = None
    if python_table:  # coap/expiring.py's map, the reference of the C table (with it the lane takes nothing)
        server.endpoint._seen = PeerWindowedMap(config.max_exchanges, window)
    pipeline = asyncio.create_task(api.pipeline.run())
    now = start = server._loop.time()  # the loop's clock: the server's timers (piggyback deadlines) run on it
    sent: list[list[tuple[bytes, Any]]] = []
    for kind, batch in steps_:
        now += 0.01
        if kind == "read":
            datagrams = [_datagram(message) for message in batch]
        elif kind == "malformed":
            datagrams = [(b"\x40\x02\x00", ADDRESSES[0]), (b"\x00\x01\x00\x05", ADDRESSES[1])]
        else:
            for _ in range(3):
                await asyncio.sleep(0)
            sink.poll()
            datagrams = []
        if datagrams:
            if server._lane is not None:
                server._lane.receive(datagrams, now)
            else:
                for data, addr in datagrams:
                    server._receive_one(data, addr, now)
        sent.append(server.endpoint.datagrams_to_send(now))
    registry = api.metrics.registry
    counted = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
        and metric.name.startswith(("tb_gateway_messages_received", "tb_gateway_refusals", "tb_gateway_auth"))
    }
    table = server.endpoint._seen
    assert isinstance(table, PeerWindowedMap if python_table else _speedups.SeenTable)
    seen = {
        key: (round(expires - start, 6), value if isinstance(value, bytes) else _fields(value, start))
        for key, expires, value in _entries(table)
    }
    windows: dict[Any, list[Any]] = {}
    for key, expires, _ in _entries(table):  # each peer's live entries, oldest first
        windows.setdefault(key[0], []).append((round(expires - start, 6), key))
    api.pipeline.close()
    sink.poll()
    await asyncio.wait_for(pipeline, 5)
    api.attributes.close()
    return {
        "sent": sent,
        "records": [(r.device.name, r.kind, r.ts, r.values, r.transport) for r in sink.records],
        "counted": counted,
        "pending": server.pending,
        "seen": seen,
        "queued": None if python_table else table.stats(),
        "windows": windows,
        "piggyback": [_fields(exchange, start) for exchange in server.endpoint._piggyback],
    }


def _entries(table: Any) -> list[tuple[Any, float, Any]]:
    """(key, expires_at, value) of the live entries, each peer's oldest first, from either table."""
    if not isinstance(table, PeerWindowedMap):
        return list(table.entries())
    items = table._items
    return [
        (key, expires, items[key][1])
        for window in table._windows.values()
        for expires, key, serial in window
        if key in items and items[key][2] == serial
    ]


def _fields(exchange: Exchange, start: float) -> tuple[Any, ...]:
    """An exchange's slots, its times from the run's start (each run reads the loop's clock)."""
    times = ("received_at", "deadline")
    return tuple(
        round(getattr(exchange, name) - start, 6)
        if name in times and getattr(exchange, name)
        else getattr(exchange, name)
        for name in EXCHANGE_FIELDS
    )


@settings(max_examples=200, deadline=None)
@given(steps, st.sampled_from([1, 2, 64]))
def test_the_lane_answers_as_the_python_path(steps_: list[tuple[str, Any]], window: int) -> None:
    """``window``: de-duplication entries kept per peer (1 and 2: the lane's put drops a peer's oldest)."""

    async def main() -> None:
        taken = await _run(steps_, lane=True, window=window)
        assert taken == await _run(steps_, lane=False, window=window)
        # and the C de-duplication table keeps what coap/expiring.py's map keeps (its queues are its own)
        reference = await _run(steps_, lane=False, window=window, python_table=True)
        assert {**taken, "queued": None} == reference

    asyncio.run(main())


def test_a_common_post_is_taken_by_the_lane_and_answered_piggybacked(tmp_path: Path) -> None:
    """The everyday request, spelled out: the lane hands nothing to the Python path, and the 2.01 carries the
    request's message id and token; a retransmission gets the same bytes back."""

    async def main() -> None:
        sink = PollOnlySink()
        api = make_api(tmp_path, sink, TOKENS)
        server = CoapServer(api, host="127.0.0.1", port=0)
        server._loop = asyncio.get_running_loop()
        server._socket = Socket()
        handed: list[Any] = []
        on_request = server._on_request
        server._on_request = lambda event: (handed.append(event), on_request(event))[1]  # type: ignore[method-assign]
        pipeline = asyncio.create_task(api.pipeline.run())
        request = encode(
            Message(CON, Code.POST, 7, b"\x01\x02", _path("api", "v1", "TOKEN_A", "telemetry"), b'{"t":1}')
        )
        address = ADDRESSES[0]
        assert server._lane is not None
        now = server._loop.time()
        server._lane.receive([(request, address)], now)  # unknown to the auth cache yet: handed to the routes
        for _ in range(3):
            await asyncio.sleep(0)
        sink.poll()
        server.endpoint.datagrams_to_send(now)
        assert len(handed) == 1
        second = encode(Message(CON, Code.POST, 8, b"\x03", _path("api", "v1", "TOKEN_A", "telemetry"), b'{"t":2}'))
        server._lane.receive([(second, address)], now)
        assert len(handed) == 1  # taken in C
        for _ in range(3):
            await asyncio.sleep(0)
        sink.poll()
        answer = bytes((0x61, Code.CREATED, 0, 8, 3))
        assert server.endpoint.datagrams_to_send(now) == [(answer, address)]
        server._lane.receive([(second, address)], now)  # a retransmission: the same reply, posted once
        assert server.endpoint.datagrams_to_send(now) == [(answer, address)]
        assert [r.values for r in sink.records] == [{"t": 1}, {"t": 2}]
        assert [r.transport for r in sink.records] == [Transport.COAP] * 2
        assert server.pending == 0
        api.pipeline.close()
        await asyncio.wait_for(pipeline, 5)
        api.attributes.close()

    asyncio.run(main())


def test_the_lane_asks_the_auth_cache_as_the_python_path_does(tmp_path: Path) -> None:
    """An expired cache entry is not used (the token is looked up again), a removed device is not served,
    and with an address blocklist or another known_device the lane asks ``api.known_device`` itself."""

    async def main() -> None:
        sink = PollOnlySink()
        api = make_api(tmp_path, sink, TOKENS)
        server = CoapServer(api, host="127.0.0.1", port=0)
        server._loop = asyncio.get_running_loop()
        server._socket = Socket()
        pipeline = asyncio.create_task(api.pipeline.run())
        source = api.auth._sources[0]
        assert server._lane is not None
        mid = 0

        async def post() -> None:
            nonlocal mid
            mid += 1
            request = Message(CON, Code.POST, mid, b"", _path("api", "v1", "TOKEN_A", "telemetry"), b'{"n":%d}' % mid)
            server._lane.receive([(encode(request), ADDRESSES[0])], server._loop.time())  # type: ignore[union-attr]
            for _ in range(5):
                await asyncio.sleep(0.01)
            sink.poll()

        await post()
        await post()
        assert source.lookups == 1  # the second from the cache
        [entry] = api.auth._cache.values()
        entry.expires_at = time.monotonic() - 1  # expired: looked up again
        await post()
        assert source.lookups == 2
        asked: list[Any] = []
        known = api.known_device
        api.known_device = lambda *args: (asked.append(args), known(*args))[1]  # type: ignore[method-assign]
        await post()
        assert len(asked) == 1 and source.lookups == 2  # another known_device is asked; it answers from the cache
        api.known_device = known  # type: ignore[method-assign]
        source.tokens.pop("TOKEN_A")  # the device is removed, and the gateway told (docs/scale-out.md)
        api.auth.invalidate()
        await post()
        assert source.lookups == 3
        assert [r.values["n"] for r in sink.records] == [1, 2, 3, 4]  # the fifth was refused: 4.01
        api.pipeline.close()
        await asyncio.wait_for(pipeline, 5)
        api.attributes.close()

    asyncio.run(main())
