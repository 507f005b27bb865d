"""HTTP connection handling in process, over raw sockets: keep-alive, pipelining, timeouts, bad requests, limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tb_gateway.http.connection import MAX_QUEUED
from tests.http_support import Raw, request, run, serving, statuses
from tests.support import MemorySink, PollOnlySink

pytestmark = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])

TELEMETRY = "/api/v1/T1/telemetry"


def test_keep_alive_reuses_one_connection(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for n in range(20):
                assert (await client.post(TELEMETRY, json={"n": n})).status_code == 200
            assert gw.metric("tb_gateway_connections_total", transport="http") == 1
            assert [r.values["n"] for r in gw.sink.records] == list(range(20))

    run(loop, main())


def test_a_durable_batch_is_answered_at_the_next_read_of_any_connection(loop: str, tmp_path: Path) -> None:
    """Each read polls the pipeline: a 200 does not wait for the loop's pass over the sockets to end."""

    async def main() -> None:
        sink = PollOnlySink()
        async with serving(tmp_path, sink=sink) as gw:
            first, second = await Raw.connect(gw.port), await Raw.connect(gw.port)
            await first.send(request("POST", TELEMETRY, b'{"n": 1}'))
            with pytest.raises(TimeoutError):  # durable (per this sink) but nobody polled yet
                await first.response(within_s=0.2)
            assert len(sink.batches) == 1
            await second.send(request("GET", "/health"))
            assert (await second.response())[0] == 200
            assert (await first.response())[0] == 200
            await first.close()
            await second.close()

    run(loop, main())


def test_pipelined_requests_are_answered_in_order(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink(delay_s=0.05)  # answers take a while, so the requests really queue up
        async with serving(tmp_path, sink=sink) as gw:
            raw = await Raw.connect(gw.port)
            burst = b"".join(
                [
                    request("POST", TELEMETRY, b'{"n": 1}'),
                    request("GET", "/nowhere"),
                    request("POST", "/api/v1/BAD/telemetry", b'{"n": 2}'),
                    request("POST", TELEMETRY, b'{"n": 3'),
                    request("POST", "/api/v1/T1/attributes", b'{"n": 4}'),
                    request("GET", "/api/v1/T1/attributes?clientKeys=n"),
                    request("GET", "/health"),
                    request("POST", TELEMETRY, b'{"n": 5}', "Connection: close"),
                ]
            )
            await raw.send(burst)
            data = await raw.until_closed()
            await raw.close()
            assert statuses(data) == [200, 404, 401, 400, 200, 200, 200, 200]
            assert data.index(b'{"client":{"n":4}}') < data.index(b'{"status":"up"}')
            assert [r.values for r in sink.records] == [{"n": 1}, {"n": 4}, {"n": 5}]

    run(loop, main())


def test_many_pipelined_requests_one_byte_at_a_time(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            burst = b"".join(request("POST", TELEMETRY, b'{"n": %d}' % n) for n in range(50))
            burst += request("GET", "/health", b"", "Connection: close")
            half = len(burst) // 2
            await raw.send(burst[:half])  # half at once ...
            for i in range(half, len(burst)):  # ... then byte by byte
                await raw.send(burst[i : i + 1])
            data = await raw.until_closed()
            await raw.close()
            assert statuses(data) == [200] * 51
            assert [r.values["n"] for r in gw.sink.records] == list(range(50))

    run(loop, main())


def test_http_1_0(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)  # no keep-alive asked: answered, then closed
            await raw.send(request("POST", TELEMETRY, b'{"a": 1}', version="1.0"))
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await raw.until_closed() == b""
            await raw.close()

            raw = await Raw.connect(gw.port)  # keep-alive asked: kept, and said so
            for n in range(3):
                await raw.send(request("POST", TELEMETRY, b'{"a": %d}' % n, "Connection: keep-alive", version="1.0"))
                status, headers, _ = await raw.response()
                assert (status, headers["connection"]) == (200, "keep-alive")
            await raw.close()
            assert gw.metric("tb_gateway_connections_total", transport="http") == 2
            assert len(gw.sink.records) == 4

    run(loop, main())


def test_connection_close_from_an_http_1_1_client(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/health", b"", "Connection: close"))
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await raw.until_closed() == b""
            await raw.close()

    run(loop, main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /api/v1/T1/telemetry HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_request_is_400_then_close(loop: str, tmp_path: Path, garbage: bytes) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(garbage)
            status, headers, body = await raw.response()
            assert (status, headers["connection"]) == (400, "close")
            assert b"malformed HTTP request" in body
            await raw.send(request("GET", "/health"))  # nothing more is read
            assert await raw.until_closed() == b""
            await raw.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="bad_request") == 1
            assert gw.sink.records == []

    run(loop, main())


def test_a_malformed_request_after_good_ones_is_answered_after_them(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, sink=MemorySink(delay_s=0.05)) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", TELEMETRY, b'{"a": 1}') + b"NONSENSE\r\n\r\n")
            data = await raw.until_closed()
            await raw.close()
            assert statuses(data) == [200, 400]

    run(loop, main())


def test_oversized_head_is_431(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(b"GET /health HTTP/1.1\r\nX-Big: ")
            for _ in range(40):  # 40 KiB of one header, never ending
                await raw.send(b"a" * 1024)
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (431, "close")
            assert await raw.until_closed() == b""
            await raw.close()
            # a large but legal head is fine
            async with httpx.AsyncClient(base_url=gw.url) as client:
                answer = await client.get("/health", headers={"X-Big": "a" * 8000})
                assert answer.status_code == 200

    run(loop, main())


def test_a_head_over_the_limit_is_431_however_it_arrives(loop: str, tmp_path: Path) -> None:
    """Whole in one read, completed by a later read, or behind a request in the same read: 431, closed."""

    async def main() -> None:
        async with serving(tmp_path) as gw:
            big = "X-Big: " + "a" * 17_000
            for parts in (
                [request("GET", "/health", b"", big)],  # one read
                [request("POST", TELEMETRY, b'{"a": 1}', big)],  # a body too
                [request("GET", "/health", b"", big)[:15_000], request("GET", "/health", b"", big)[15_000:]],
            ):
                raw = await Raw.connect(gw.port)
                for part in parts:
                    await raw.send(part)
                    await asyncio.sleep(0.05)
                data = await raw.until_closed()
                await raw.close()
                assert statuses(data) == [431]
                assert b"Connection: close" in data
            raw = await Raw.connect(gw.port)  # a small request, then a big head in the same read
            await raw.send(request("POST", TELEMETRY, b'{"b": 2}') + request("GET", "/health", b"", big))
            data = await raw.until_closed()
            await raw.close()
            assert statuses(data) == [200, 431]
            assert [r.values for r in gw.sink.records] == [{"b": 2}]
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="headers_too_large") == 4

    run(loop, main())


def test_pipelined_small_requests_never_get_431(loop: str, tmp_path: Path) -> None:
    """The head limit is per head: bytes of earlier requests in the same read are not counted."""

    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            one = request("GET", "/api/v1/T1/attributes", b"", "X-Pad: " + "p" * 250)
            last = request("POST", TELEMETRY, b'{"a": 1}')
            await raw.send(one * 60 + last[:20])  # ~18 KiB of small heads, the last one cut short
            await asyncio.sleep(0.1)
            await raw.send(last[20:])
            for _ in range(61):
                assert (await raw.response())[0] == 200
            # a head split across reads, then a 20 KB body and the start of the next head in one read
            first = request("POST", TELEMETRY, b'{"big": "' + b"x" * 20_000 + b'"}')
            second = request("POST", TELEMETRY, b'{"b": 2}')
            await raw.send(first[:30])
            await asyncio.sleep(0.1)
            await raw.send(first[30:] + second[:25])
            await asyncio.sleep(0.1)
            await raw.send(second[25:])
            assert [(await raw.response())[0] for _ in range(2)] == [200, 200]
            # a chunked body of many small chunks, then the start of the next head, in one read
            chunks = b"".join(b"1\r\n%c\r\n" % byte for byte in b'{"c": "' + b"y" * 4000 + b'"}') + b"0\r\n\r\n"
            chunked = b"POST /api/v1/T1/telemetry HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
            await raw.send(chunked + second[:25])
            await asyncio.sleep(0.1)
            await raw.send(second[25:])
            assert [(await raw.response())[0] for _ in range(2)] == [200, 200]
            await raw.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="headers_too_large") == 0
            assert len(gw.sink.records) == 5

    run(loop, main())


def test_the_first_head_is_timed_from_the_connection_opening(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_header_timeout_seconds=1.0) as gw:
            raw = await Raw.connect(gw.port)
            started = time.monotonic()
            await asyncio.sleep(0.7)
            await raw.send(b"P")  # the first byte does not restart the clock
            status, headers, _ = await raw.response()
            elapsed = time.monotonic() - started
            assert (status, headers["connection"]) == (408, "close")
            assert 0.95 <= elapsed < 1.55  # not 0.7 + 1.0
            await raw.close()

    run(loop, main())


def test_slow_headers_get_408_then_close(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_header_timeout_seconds=0.4) as gw:
            raw = await Raw.connect(gw.port)
            started = time.monotonic()
            for part in (b"POST /api/v1/T1/tele", b"metry HTTP/1.1\r\n", b"Host: x\r\n"):
                await raw.send(part)
                await asyncio.sleep(0.15)
            status, headers, _ = await raw.response()
            elapsed = time.monotonic() - started
            assert (status, headers["connection"]) == (408, "close")
            assert 0.35 <= elapsed < 1.5
            assert await raw.until_closed() == b""
            await raw.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="timeout") == 1

    run(loop, main())


def test_slow_body_gets_408_then_close(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_body_timeout_seconds=0.4) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (408, "close")
            assert 0.35 <= time.monotonic() - started < 1.5
            assert await raw.until_closed() == b""
            await raw.close()
            assert gw.sink.records == []

    run(loop, main())


def test_a_body_that_keeps_coming_in_time_is_fine(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_body_timeout_seconds=1.0, http_header_timeout_seconds=1.0) as gw:
            raw = await Raw.connect(gw.port)
            body = b'{"a": 1}'
            await raw.send(b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: 8\r\n\r\n")
            for byte in body:
                await asyncio.sleep(0.05)
                await raw.send(bytes([byte]))
            assert (await raw.response())[0] == 200
            await raw.close()

    run(loop, main())


def test_idle_keep_alive_connection_is_closed_silently(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_idle_timeout_seconds=0.4) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", TELEMETRY, b'{"a": 1}'))
            assert (await raw.response())[0] == 200
            started = time.monotonic()
            assert await raw.until_closed() == b""  # no 408 for a client that asked nothing
            assert 0.3 <= time.monotonic() - started < 1.5
            await raw.close()
            assert not gw.server.connections

    run(loop, main())


def test_a_connection_that_never_speaks_is_closed(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_header_timeout_seconds=0.3) as gw:
            raw = await Raw.connect(gw.port)
            assert await raw.until_closed() == b""
            await raw.close()

    run(loop, main())


def test_max_connections(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, http_max_connections=2) as gw:
            first, second = await Raw.connect(gw.port), await Raw.connect(gw.port)
            await asyncio.sleep(0.05)
            third = await Raw.connect(gw.port)
            status, headers, body = await third.response()
            assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
            assert body == b'{"error":"max connections"}'
            assert await third.until_closed() == b""
            for raw in (first, second):
                await raw.send(request("GET", "/health"))
                assert (await raw.response())[0] == 200
                await raw.close()
            await asyncio.sleep(0.05)
            fourth = await Raw.connect(gw.port)  # room again
            await fourth.send(request("GET", "/health"))
            assert (await fourth.response())[0] == 200
            await fourth.close()
            await third.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="max_connections") == 1

    run(loop, main())


def test_upgrade_is_not_offered(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/health", b"", "Connection: Upgrade", "Upgrade: h2c") + b"junk")
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await raw.until_closed() == b""
            await raw.close()

    run(loop, main())


UPGRADE = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")


def test_an_upgrade_request_with_a_body_is_answered_as_a_plain_request(loop: str, tmp_path: Path) -> None:
    """What `curl --http2 -d ...` sends on http://: RFC 9110 §7.8, the Upgrade is ignored, the body read."""

    async def main() -> None:
        async with serving(tmp_path) as gw:
            chunked = (
                b"POST /api/v1/T1/telemetry HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                + "\r\n".join(UPGRADE).encode()
                + b'\r\n\r\n4\r\n{"b"\r\n4\r\n: 2}\r\n0\r\n\r\n'
            )
            whole = request("POST", TELEMETRY, b'{"a": 1}', *UPGRADE)
            head, _, body = whole.partition(b"\r\n\r\n")
            for parts in (
                [whole + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],  # what follows is not read
                [chunked + b"junk"],
                [head + b"\r\n\r\n{", body[1:]],  # the body in a later read
                [request("POST", TELEMETRY, b'{"d": ', *UPGRADE)],  # a bad payload: 400, still closed
            ):
                raw = await Raw.connect(gw.port)
                for part in parts:
                    await raw.send(part)
                    await asyncio.sleep(0.05)
                data = await raw.until_closed()
                await raw.close()
                assert statuses(data) == ([400] if b'"d"' in parts[0] else [200])
                assert b"Connection: close" in data
            assert [r.values for r in gw.sink.records] == [{"a": 1}, {"b": 2}, {"a": 1}]
            assert gw.metric("tb_gateway_errors_total", component="http") == 0
            raw = await Raw.connect(gw.port)  # over the size limit: refused before the body, as always
            await raw.send(request("POST", TELEMETRY, b"x" * 70_000, *UPGRADE))
            assert statuses(await raw.until_closed()) == [413]
            await raw.close()

    run(loop, main())


def test_connect_is_refused_and_closes(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (404, "close")
            assert await raw.until_closed() == b""
            await raw.close()

    run(loop, main())


def test_a_client_that_goes_away_mid_request(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()
        async with serving(tmp_path, sink=sink) as gw:
            raw = await Raw.connect(gw.port)  # half a body, then gone
            await raw.send(b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            await raw.close()
            raw = await Raw.connect(gw.port)  # a whole request, gone before the answer
            await raw.send(request("POST", TELEMETRY, b'{"a": 1}'))
            await asyncio.sleep(0.1)
            await raw.close()
            await asyncio.sleep(0.1)
            sink.gate.set()
            await asyncio.sleep(0.1)
            assert [r.values for r in sink.records] == [{"a": 1}]  # admitted, so still delivered
            assert not gw.server.connections

    run(loop, main())


def test_drain_answers_admitted_requests_then_closes(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()
        async with serving(tmp_path, sink=sink) as gw:
            idle = await Raw.connect(gw.port)
            busy = await Raw.connect(gw.port)
            await busy.send(request("POST", TELEMETRY, b'{"a": 1}'))
            await asyncio.sleep(0.1)
            gw.server.stop_accepting()
            draining = asyncio.create_task(gw.server.drain())
            assert await idle.until_closed() == b""  # nothing owed: closed at once
            await asyncio.sleep(0.1)
            assert not draining.done()  # waits for the admitted request
            sink.gate.set()
            status, headers, _ = await busy.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await busy.until_closed() == b""
            await asyncio.wait_for(draining, 2)
            with pytest.raises(OSError):
                await Raw.connect(gw.port)
            for raw in (idle, busy):
                await raw.close()

    run(loop, main())


def test_drain_refuses_a_half_sent_request_with_when_to_try_again(loop: str, tmp_path: Path) -> None:
    """A request whose body is still arriving when the drain starts is refused 503 with Retry-After (as every
    503), counted, and the connection closes."""

    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" % TELEMETRY.encode()
            raw.writer.write(head + b'{"a": ')
            await raw.writer.drain()
            await asyncio.sleep(0.1)
            gw.server.stop_accepting()
            draining = asyncio.create_task(gw.server.drain())
            status, headers, body = await raw.response()
            assert (status, headers["connection"], body) == (503, "close", b'{"error":"shutting down"}')
            assert headers["retry-after"] == str(gw.api.settings.retry_after_seconds)
            assert await raw.until_closed() == b""  # our side is closed; it lingers until the client closes
            await raw.close()
            await asyncio.wait_for(draining, 5)
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="shutting_down") == 1
            assert gw.sink.records == []

    run(loop, main())


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, sink=MemorySink(delay_s=0.1)) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", TELEMETRY, b'{"a": 1}') + request("GET", "/health"))
            raw.writer.write_eof()
            data = await raw.until_closed()
            await raw.close()
            assert statuses(data) == [200, 200]
            assert data.count(b"Connection: close") == 1  # only the last answer says so
            assert [r.values for r in gw.sink.records] == [{"a": 1}]

    run(loop, main())


def test_pipelining_beyond_the_hard_cap_is_refused(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()  # the first answer waits, so the others queue up
        async with serving(tmp_path, sink=sink) as gw:
            raw = await Raw.connect(gw.port)
            one = request("POST", TELEMETRY, b"{}")
            raw.writer.write(request("POST", TELEMETRY, b'{"a": 1}') + one * 300)  # ~25 KiB in one write
            await asyncio.sleep(0.2)
            sink.gate.set()
            data = await raw.until_closed()
            await raw.close()
            codes = statuses(data)
            assert codes[:MAX_QUEUED] == [200] * MAX_QUEUED  # answered in order ...
            assert codes[MAX_QUEUED:] == [400]  # ... then refused and closed
            assert b"pipelined requests" in data

    run(loop, main())


def test_a_pipelined_request_behind_a_busy_one_gets_its_body_read(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()
        async with serving(tmp_path, sink=sink) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", TELEMETRY, b'{"n": 1}'))  # busy: held at the sink
            await raw.send(b"POST /api/v1/T1/telemetry HTTP/1.1\r\nContent-Length: 8\r\n\r\n{")
            await asyncio.sleep(0.1)
            (connection,) = gw.server.connections
            assert connection.paused  # its token is checked only when its turn comes
            sink.gate.set()
            assert (await raw.response())[0] == 200
            await asyncio.sleep(0.1)
            assert not connection.paused
            await raw.send(b'"n": 2}')
            assert (await raw.response())[0] == 200
            await raw.close()
            assert [r.values for r in sink.records] == [{"n": 1}, {"n": 2}]

    run(loop, main())
