"""The HTTP fast lane's reader (``_speedups.http_post``) against httptools, the reference.

The fast lane may decline anything (the connection then feeds httptools), but whatever it accepts must be
exactly what httptools reads: one whole POST, the same target and body, HTTP/1.1, keep-alive, no upgrade.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.http import connection
from tb_gateway.sinks.base import Outcome
from tests.http_support import Raw, request, run, serving, statuses

_speedups: Any
try:
    from tb_gateway import _speedups
except ImportError:  # built without a C compiler: there is no fast lane to check
    _speedups = None

pytestmark = pytest.mark.skipif(_speedups is None, reason="the C fast path is not built")

MAX_HEAD = 16 * 1024
BODY = b'{"temperature":42.5,"humidity":73}'
WRK = (  # what wrk and most device clients send
    b"POST /api/v1/TOKEN_1/telemetry HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)


def fast(data: bytes) -> tuple[bytes, bytes] | None:
    return _speedups.http_post(data, MAX_HEAD)  # type: ignore[no-any-return]


class Reading:
    """What httptools makes of ``data``: every message, and whether it stopped with an error."""

    def __init__(self, data: bytes) -> None:
        self.messages: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = exc

    def on_message_begin(self) -> None:
        self.messages.append({"url": b"", "body": b"", "complete": False})

    def on_url(self, url: bytes) -> None:
        self.messages[-1]["url"] += url

    def on_headers_complete(self) -> None:
        parser = self.parser
        message = self.messages[-1]
        message["method"] = parser.get_method()
        message["version"] = parser.get_http_version()
        message["keep_alive"] = parser.should_keep_alive()
        message["upgrade"] = parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body

    def on_message_complete(self) -> None:
        self.messages[-1]["complete"] = True


def agrees(data: bytes) -> None:
    """The fast lane's answer, if any, is httptools' reading of the same bytes."""
    hit = fast(data)
    if hit is None:
        return
    target, body = hit
    reading = Reading(data)
    assert reading.error is None, (data, reading.error)
    assert len(reading.messages) == 1, data
    (message,) = reading.messages
    assert message == {
        "url": target,
        "body": body,
        "complete": True,
        "method": b"POST",
        "version": "1.1",
        "keep_alive": True,
        "upgrade": False,
    }, data


def test_reads_what_clients_send() -> None:
    assert fast(WRK) == (b"/api/v1/TOKEN_1/telemetry", BODY)
    agrees(WRK)
    minimal = b"POST /api/v1/T/attributes?x=1 HTTP/1.1\r\ncontent-length:2\r\n\r\n{}"
    assert fast(minimal) == (b"/api/v1/T/attributes?x=1", b"{}")
    agrees(minimal)
    empty = b"POST /api/v1/T/claim HTTP/1.1\r\nContent-Length: 0 \r\nX-Tab:\tv\t\r\n\r\n"
    assert fast(empty) == (b"/api/v1/T/claim", b"")
    agrees(empty)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        WRK[:-1],  # the body is not all here
        WRK + b"x",  # more than one request's bytes
        WRK + WRK,  # pipelined: left to httptools
        WRK[: WRK.index(b"\r\n\r\n")],  # the head is cut
        WRK.replace(b"POST", b"GET", 1),
        WRK.replace(b"POST", b"post", 1),
        WRK.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        WRK.replace(b"HTTP/1.1", b"HTTP/2.0", 1),
        WRK.replace(b"/api", b"http://h/api", 1),  # absolute form
        WRK.replace(b"TOKEN_1", b"TOK EN", 1),
        WRK.replace(b"TOKEN_1", b"TOK{EN}", 1),
        WRK.replace(b"TOKEN_1", "TØKEN".encode(), 1),
        WRK.replace(b"Host:", b"Connection: close\r\nHost:", 1),
        WRK.replace(b"Host:", b"Connection: keep-alive\r\nHost:", 1),
        WRK.replace(b"Host:", b"Proxy-Connection: close\r\nHost:", 1),
        WRK.replace(b"Host:", b"Expect: 100-continue\r\nHost:", 1),
        WRK.replace(b"Host:", b"Upgrade: websocket\r\nHost:", 1),
        WRK.replace(b"Host:", b"Transfer-Encoding: chunked\r\nHost:", 1),
        WRK.replace(b"Host:", b"TRANSFER-ENCODING: identity\r\nHost:", 1),
        WRK.replace(b"Host:", b"Content-Length: %d\r\nHost:" % len(BODY), 1),  # twice
        WRK.replace(b"Content-Length: ", b"Content-Length: +", 1),
        WRK.replace(b"Content-Length: ", b"Content-Length: 0x", 1),
        WRK.replace(b"Content-Length: %d" % len(BODY), b"Content-Length:", 1),
        WRK.replace(b"Content-Length: %d" % len(BODY), b"Content-Length: 0000000000%d" % len(BODY), 1),
        WRK.replace(b"Content-Length: %d\r\n" % len(BODY), b"", 1),  # no length: no body in HTTP/1.1
        WRK.replace(b"Host: ", b"Host : ", 1),  # space before the colon
        WRK.replace(b"Host: ", b"Host:\r\n x", 1),  # obs-fold
        WRK.replace(b"\r\nHost", b"\nHost", 1),  # bare LF
        WRK.replace(b"\r\n\r\n", b"\n\r\n", 1),
        WRK.replace(b"Host: 127", b"Host: \x00127", 1),
        WRK.replace(b"Host: 127", b"Host: \x7f127", 1),
        WRK.replace(b"Host: 127", "Host: ü127".encode(), 1),
        WRK.replace(b"Host: ", b"H\x01st: ", 1),
        WRK.replace(b"Host: ", b": ", 1),  # no name
        b"POST / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\nContent-Length: 0\r\n\r\n",  # head over the limit
    ],
)
def test_leaves_everything_else_to_httptools(data: bytes) -> None:
    assert fast(data) is None


def test_a_head_within_the_limit_is_read() -> None:
    filler = b"a" * (MAX_HEAD - 100)
    data = b"POST / HTTP/1.1\r\nX: " + filler + b"\r\nContent-Length: 1\r\n\r\nz"
    assert fast(data) == (b"/", b"z")
    agrees(data)


def test_refuses_wrong_arguments() -> None:
    with pytest.raises(TypeError):
        _speedups.http_post("text", MAX_HEAD)
    with pytest.raises(TypeError):
        _speedups.http_post(WRK)


# -- generated requests: near-misses of the accepted grammar, and mutations of real requests --------------

# Each part is usually right and sometimes a near miss, so that many requests are whole and valid, and
# the rest differ from a valid one in one or two places.
METHODS = st.sampled_from([b"POST"] * 12 + [b"GET", b"PUT", b"POSTX", b"PATCH", b"post"])
VERSIONS = st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2", b"http/1.1", b"HTTP/1.1 "])
TARGET_BYTES = st.sampled_from(
    list(b"/azAZ09-._~!$&'()*+,;=:@?%") * 3 + [32, 9, 34, 35, 60, 62, 92, 94, 123, 127, 0, 200]  # and odd ones
)
TARGETS = st.lists(TARGET_BYTES, max_size=30).map(lambda chars: b"/" + bytes(chars))
NAMES = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Content-Type",
            b"content-length",
            b"CONTENT-LENGTH",
            b"Content-Length ",
            b"Connection",
            b"Transfer-Encoding",
            b"Expect",
            b"Upgrade",
            b"Proxy-Connection",
            b"X-Custom",
            b"",
        ]
    ),
    st.binary(min_size=1, max_size=8),
    st.text("abcXYZ-_!#$%&'*+.^`|~019", min_size=1, max_size=8).map(str.encode),
)
VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"2", b"12", b" 12 ", b"chunked", b"close", b"keep-alive", b"100-continue"]),
    st.binary(max_size=12),
    st.binary(max_size=12).map(lambda b: bytes(c % 95 + 32 for c in b)),  # printable
)
ENDINGS = st.sampled_from([b"\r\n"] * 15 + [b"\n", b"\r", b"\r\n "])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=20))
    line = b"%b %b %b" % (draw(METHODS), draw(TARGETS), draw(VERSIONS))
    headers = [
        b"%b:%b%b" % (draw(NAMES), draw(st.sampled_from([b"", b" ", b"\t"])), draw(VALUES))
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.integers(0, 5)):
        length = draw(st.sampled_from([len(body)] * 6 + [len(body) + 1, max(len(body) - 1, 0)]))
        headers.insert(draw(st.integers(0, len(headers))), b"Content-Length: %d" % length)
    ending = draw(ENDINGS)
    return line + ending + b"".join(header + draw(ENDINGS) for header in headers) + ending + body


@settings(max_examples=3000, deadline=None)
@given(requests())
def test_generated_requests_read_as_httptools_reads_them(data: bytes) -> None:
    agrees(data)


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, len(WRK) - 1), st.binary(max_size=3), st.integers(0, 3))
def test_mutated_requests_read_as_httptools_reads_them(at: int, insert: bytes, remove: int) -> None:
    agrees(WRK[:at] + insert + WRK[at + remove :])


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_read_as_httptools_reads_them(data: bytes) -> None:
    agrees(b"POST /" + data)


# -- the fast lane in the connection -----------------------------------------------------------------------

TELEMETRY = "/api/v1/T1/telemetry"


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The targets of the requests the fast lane took (its lane counts them: ``HttpLane.taken``); each
    request httptools read adds ``b"general"``."""
    targets: list[bytes] = []
    begin = connection.HttpConnection.on_message_begin
    receive = connection.HttpConnection.data_received

    def general(self: connection.HttpConnection) -> None:
        targets.append(b"general")
        begin(self)

    def received(self: connection.HttpConnection, data: bytes) -> None:
        before = self.lane.taken
        receive(self, data)
        if self.lane.taken != before:
            hit = fast(data)
            assert hit is not None  # the lane takes only what the reader accepts
            targets.append(hit[0])

    monkeypatch.setattr(connection.HttpConnection, "on_message_begin", general)
    monkeypatch.setattr(connection.HttpConnection, "data_received", received)
    yield targets


COUNTED = {
    "auth failures": ("tb_gateway_auth_failures_total", {}),
    "bad payloads": ("tb_gateway_refusals_total", {"reason": "bad_payload"}),
    "rate limited": ("tb_gateway_refusals_total", {"reason": "rate_limited"}),
    "received": ("tb_gateway_messages_received_total", {}),
}


async def _served(tmp_path: Path, requests: list[bytes], *, whole: bool, **settings: Any) -> dict[str, Any]:
    """Each request on its own connection, after one that fills the auth cache; whole or byte by byte."""
    async with serving(tmp_path, tokens={"T1": "dev1"}, **settings) as gw:
        warm = await Raw.connect(gw.port)
        await warm.send(request("GET", "/api/v1/T1/attributes"))
        assert (await warm.response())[0] == 200
        await warm.close()
        answers = []
        for data in requests:
            raw = await Raw.connect(gw.port)
            for chunk in [data] if whole else [data[i : i + 1] for i in range(len(data))]:
                raw.writer.write(chunk)
                await raw.writer.drain()
            status, headers, body = await raw.response()
            answers.append((status, {k: v for k, v in headers.items() if k != "date"}, body))
            await raw.close()
        return {
            "answers": answers,
            "records": [(r.device.name, r.kind.value, r.values) for r in gw.sink.records],
            **{what: gw.metric(name, transport="http", **labels) for what, (name, labels) in COUNTED.items()},
        }


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_fast_lane_answers_as_the_general_path(loop: str, tmp_path: Path, taken: list[bytes]) -> None:
    requests = [
        request("POST", TELEMETRY, b'{"n": 1}'),
        request("POST", "/api/v1/T1/attributes", b'{"a": "x"}'),
        request("POST", "/api/v1/T1/claim", b""),
        request("POST", TELEMETRY, b"{}"),  # nothing to store: answered at once
        request("POST", TELEMETRY, b'{"n": '),  # 400, counted once
        request("POST", "/api/v1/T1/attributes", b"[1]"),
        request("POST", "/api/v1/NOPE/telemetry", b'{"n": 2}'),  # 401, counted once
        request("POST", "/api/v1/NOPE/telemetry", b'{"n": 3}'),  # 401 from the cache
        request("POST", TELEMETRY, b'{"n": 4}'),
        request("POST", TELEMETRY, b'{"n": 5}'),  # over the rate limit: 429
    ]
    limits = {"rate_limit_enabled": True, "rate_limit_device_telemetry_messages": "3:60"}

    async def main() -> None:
        fast_lane = await _served(tmp_path / "fast", requests, whole=True, **limits)
        fast_targets = list(taken)  # taken by the fast lane (the two NOPE go the general way)
        taken.clear()
        general = await _served(tmp_path / "general", requests, whole=False, **limits)
        assert fast_lane == general
        assert [status for status, _, _ in fast_lane["answers"]] == [200, 200, 200, 200, 400, 400, 401, 401, 200, 429]
        assert (fast_lane["auth failures"], fast_lane["bad payloads"], fast_lane["rate limited"]) == (2, 2, 1)
        assert fast_lane["received"] == 8
        assert fast_lane["records"] == [
            ("dev1", "telemetry", {"n": 1}),
            ("dev1", "attributes", {"a": "x"}),
            ("dev1", "claim", {"secretKey": "", "durationMs": 0}),
            ("dev1", "telemetry", {"n": 4}),
        ]
        telemetry, attributes = b"/api/v1/T1/telemetry", b"/api/v1/T1/attributes"
        assert fast_targets == [
            b"general",  # the request that fills the auth cache: a GET
            telemetry,
            attributes,
            b"/api/v1/T1/claim",
            telemetry,
            telemetry,
            attributes,
            b"general",  # a token the cache does not know goes the general way
            b"general",  # a cached refusal too
            telemetry,
            telemetry,
        ]
        assert taken == [b"general"] * (1 + len(requests))  # byte by byte, nothing is whole

    run(loop, main())


class StalledTransport:
    """A transport whose peer stopped reading: the test says when writing is paused and resumed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def _watched_connection(gw: Any, taken: list[bytes]) -> tuple[connection.HttpConnection, StalledTransport]:
    """After a POST that fills the auth cache ({"n": 0}), a connection on a transport the test watches."""
    warm = await Raw.connect(gw.port)
    await warm.send(request("POST", TELEMETRY, b'{"n": 0}'))
    assert (await warm.response())[0] == 200
    await warm.close()
    taken.clear()
    peer = connection.HttpConnection(gw.server)
    transport = StalledTransport()
    peer.connection_made(transport)  # type: ignore[arg-type]
    return peer, transport


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_stopped_reading_is_not_served_by_the_fast_lane(
    loop: str, tmp_path: Path, taken: list[bytes]
) -> None:
    """Its requests wait (the general path posts nothing while writing is paused), so answers cannot pile up."""

    async def main() -> None:
        async with serving(tmp_path, tokens={"T1": "dev1"}) as gw:
            peer, transport = await _watched_connection(gw, taken)
            peer.pause_writing()
            peer.data_received(request("POST", TELEMETRY, b'{"n": 1}'))
            await asyncio.sleep(0.1)
            assert taken == [b"general"]
            assert [r.values for r in gw.sink.records] == [{"n": 0}]  # not posted yet
            peer.resume_writing()
            for _ in range(100):
                if transport.written:
                    break
                await asyncio.sleep(0.01)
            assert statuses(b"".join(transport.written)) == [200]
            assert [r.values for r in gw.sink.records] == [{"n": 0}, {"n": 1}]
            peer.data_received(request("POST", TELEMETRY, b'{"n": 2}'))  # reading again: the fast lane
            assert taken == [b"general", b"/api/v1/T1/telemetry"]
            peer.connection_lost(None)

    run(loop, main())


async def _in_flight(gw: Any, taken: list[bytes]) -> tuple[connection.HttpConnection, StalledTransport]:
    """A connection (on a transport the test watches) whose fast-lane POST waits in the gated sink."""
    peer, transport = await _watched_connection(gw, taken)
    gw.sink.gate.clear()
    peer.data_received(request("POST", TELEMETRY, b'{"n": 1}'))
    assert taken == [b"/api/v1/T1/telemetry"]
    return peer, transport


async def _answers(transport: StalledTransport, count: int) -> list[int]:
    for _ in range(200):
        if len(statuses(b"".join(transport.written))) >= count:
            break
        await asyncio.sleep(0.01)
    return statuses(b"".join(transport.written))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_what_happens_while_a_fast_lane_post_is_in_flight_is_answered_as_the_general_path_would(
    loop: str, tmp_path: Path, taken: list[bytes]
) -> None:
    """The fast lane writes its 200 itself only when nothing happened meanwhile; a pipelined request, a
    refusal from the sink and the client's EOF take the general path's answer."""

    async def main() -> None:
        async with serving(tmp_path / "pipelined", tokens={"T1": "dev1"}) as gw:
            peer, transport = await _in_flight(gw, taken)
            peer.data_received(request("POST", TELEMETRY, b'{"n": 2}'))  # read by httptools, queued behind
            assert taken[-1] == b"general"
            gw.sink.gate.set()
            assert await _answers(transport, 2) == [200, 200]
            assert [r.values for r in gw.sink.records] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert not transport.closing
            peer.data_received(request("POST", TELEMETRY, b'{"n": 3}'))  # idle again: the fast lane
            assert taken[-1] == b"/api/v1/T1/telemetry"
            assert await _answers(transport, 3) == [200, 200, 200]
            peer.connection_lost(None)

        async with serving(tmp_path / "refused", tokens={"T1": "dev1"}) as gw:
            peer, transport = await _in_flight(gw, taken)
            gw.sink.outcome_for["dev1"] = Outcome.SINK_FAILED
            gw.sink.gate.set()
            assert await _answers(transport, 1) == [500]
            assert b'"sink_failed"' in b"".join(transport.written)
            assert not transport.closing  # an answered refusal keeps the connection
            peer.connection_lost(None)

        async with serving(tmp_path / "eof", tokens={"T1": "dev1"}) as gw:
            peer, transport = await _in_flight(gw, taken)
            assert peer.eof_received() is True  # our half stays open for the answer
            gw.sink.gate.set()
            assert await _answers(transport, 1) == [200]
            assert b"Connection: close" in b"".join(transport.written)
            assert transport.closing  # then closed, as after any last answer
            peer.connection_lost(None)

    run(loop, main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_one_connection_posting_to_several_targets_is_routed_per_request(
    loop: str, tmp_path: Path, taken: list[bytes]
) -> None:
    """The lane keeps the last target's route per connection: a new target is routed afresh, every time."""
    posts = [
        ("/api/v1/T1/telemetry", b'{"n": 1}'),
        ("/api/v1/T1/attributes", b'{"a": 1}'),
        ("/api/v1/T2/telemetry", b'{"n": 2}'),
        ("/api/v1/T2/telemetry", b'{"n": 3}'),
        ("/api/v1/T1/telemetry", b'{"n": 4}'),
        ("/api/v1/T1/telemetryX", b'{"n": 5}'),  # same length as nothing before, unknown: 404
        ("/api/v1/T1/telemetry", b'{"n": 6}'),
    ]

    async def main() -> None:
        async with serving(tmp_path, tokens={"T1": "dev1", "T2": "dev2"}) as gw:
            for token in ("T1", "T2"):  # the auth cache knows both devices
                warm = await Raw.connect(gw.port)
                await warm.send(request("GET", f"/api/v1/{token}/attributes"))
                assert (await warm.response())[0] == 200
                await warm.close()
            taken.clear()
            raw = await Raw.connect(gw.port)
            answers = []
            for target, body in posts:
                await raw.send(request("POST", target, body))
                answers.append((await raw.response())[0])
            await raw.close()
            assert answers == [200, 200, 200, 200, 200, 404, 200]
            assert [(r.device.name, r.kind.value, r.values) for r in gw.sink.records] == [
                ("dev1", "telemetry", {"n": 1}),
                ("dev1", "attributes", {"a": 1}),
                ("dev2", "telemetry", {"n": 2}),
                ("dev2", "telemetry", {"n": 3}),
                ("dev1", "telemetry", {"n": 4}),
                ("dev1", "telemetry", {"n": 6}),
            ]
            assert taken == [target.encode() for target, _ in posts[:5]] + [b"general", posts[6][0].encode()]

    run(loop, main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_lane_reads_attributes_as_python_does_after_their_class_changed(
    loop: str, tmp_path: Path, taken: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lanes keep where an attribute lives per call site (_speedups.h, GETATTR): a slot's offset, valid
    while its class is unchanged. Here HttpServer.draining (a slot the lane has read) becomes a property
    saying True: the lane must see it, leave the request to the general path, which closes after answering."""

    async def main() -> None:
        async with serving(tmp_path, tokens={"T1": "dev1"}) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", TELEMETRY, b'{"n": 0}'))  # fills the auth cache
            assert (await raw.response())[0] == 200
            await raw.send(request("POST", TELEMETRY, b'{"n": 1}'))
            assert (await raw.response())[0] == 200
            assert taken[-1] == TELEMETRY.encode()  # the lane read draining (False) from the slot
            monkeypatch.setattr(type(gw.server), "draining", property(lambda server: True), raising=True)
            await raw.send(request("POST", TELEMETRY, b'{"n": 2}'))
            status, headers, _ = await raw.response()
            assert (status, headers.get("connection")) == (200, "close")
            assert taken[-1] == b"general"
            assert [r.values for r in gw.sink.records] == [{"n": 0}, {"n": 1}, {"n": 2}]
            monkeypatch.undo()  # the slot again, before the server shuts down
            await raw.close()

    run(loop, main())
