"""Property tests of the HTTP connection: any chunking gives the same answers; no input makes it fail."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http_support import Raw, request, run, serving, statuses
from tests.support import MemorySink

TELEMETRY = "/api/v1/T1/telemetry"

STREAM = b"".join(
    [
        request("POST", TELEMETRY, b'{"n": 1}'),
        request("POST", "/api/v1/BAD/telemetry", b'{"n": 2}'),
        b'POST /api/v1/T1/telemetry HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"n\r\n5\r\n": 3}\r\n0\r\n\r\n',
        request("POST", TELEMETRY, b'{"n": '),
        request("GET", "/nowhere"),
        request("POST", "/api/v1/T1/attributes", b'{"n": 4}'),
        request("GET", "/api/v1/T1/attributes?clientKeys=n"),
        request("GET", "/api/v1/T1/telemetry"),
        request("POST", TELEMETRY, b'{"n": 5}', "Connection: close"),
    ]
)
EXPECTED = [200, 401, 200, 400, 404, 200, 200, 405, 200]

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def _exchange(chunks: list[bytes], *, sink: MemorySink | None = None) -> tuple[bytes, MemorySink, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with serving(Path(tmp), sink=sink, http_header_timeout_seconds=1.0) as gw:
            raw = await Raw.connect(gw.port)
            for chunk in chunks:
                raw.writer.write(chunk)
                await raw.writer.drain()
                await asyncio.sleep(0)
            raw.writer.write_eof()
            data = await raw.until_closed()
            await raw.close()
            return data, gw.sink, gw.metric("tb_gateway_errors_total", component="http")


@SETTINGS
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=30))
def test_any_chunking_gives_the_same_answers(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]

    async def main() -> None:
        data, sink, errors = await _exchange(chunks, sink=MemorySink(delay_s=0.002))
        assert statuses(data) == EXPECTED
        assert b'{"client":{"n":4}}' in data
        assert [r.values["n"] for r in sink.records] == [1, 3, 4, 5]
        assert errors == 0

    run("uvloop", main())


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda prefix, junk: STREAM[:prefix] + junk,
            st.integers(min_value=0, max_value=len(STREAM)),
            st.binary(max_size=60),
        ),
    )
)
def test_no_input_makes_the_server_fail(data: bytes) -> None:
    async def main() -> None:
        answers, _, errors = await _exchange([data])
        assert errors == 0  # every input is answered or refused, never an internal error
        assert set(statuses(answers)) <= {200, 400, 401, 404, 405, 413, 431}
        assert answers.count(b"HTTP/1.1 ") == len(statuses(answers))  # every answer is a well-formed status line

    run("uvloop", main())
