"""The HTTP device API in process: every endpoint and status code, and the delivery contract (DESIGN.md §4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tb_gateway.attributes import SHARED
from tb_gateway.auth import AccessToken, AuthService, Credentials
from tb_gateway.errors import CredentialsUnavailable, RetriableSinkError
from tb_gateway.records import DeviceIdentity, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tests.http_support import Raw, Running, request, run, serving
from tests.support import MemorySink

pytestmark = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def test_post_telemetry_attributes_and_claim(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.post("/api/v1/T1/telemetry", content=b'{"temperature": 42, "on": true}')
            assert (answer.status_code, answer.content) == (200, b"")
            answer = await client.post("/api/v1/T1/telemetry", json=[{"ts": 1000, "values": {"a": 1}}, {"b": 2}])
            assert answer.status_code == 200
            answer = await client.post("/api/v1/T1/attributes", json={"fw": "v1"})
            assert (answer.status_code, answer.content) == (200, b"")
            answer = await client.post("/api/v1/T1/claim", content=b"")
            assert (answer.status_code, answer.content) == (200, b"")
            answer = await client.post("/api/v1/T1/claim", json={"secretKey": "s", "durationMs": 60000})
            assert answer.status_code == 200
            answer = await client.post("/api/v1/T1/telemetry", content=b"{}")  # the SDK's connectivity probe
            assert (answer.status_code, answer.content) == (200, b"")
            records = gw.sink.records
            assert [(r.kind, r.values) for r in records] == [
                (RecordKind.TELEMETRY, {"temperature": 42, "on": True}),
                (RecordKind.TELEMETRY, {"a": 1}),
                (RecordKind.TELEMETRY, {"b": 2}),
                (RecordKind.ATTRIBUTES, {"fw": "v1"}),
                (RecordKind.CLAIM, {"secretKey": "", "durationMs": 0}),
                (RecordKind.CLAIM, {"secretKey": "s", "durationMs": 60000}),
            ]
            assert records[1].ts == 1000
            assert {r.transport for r in records} == {Transport.HTTP}
            assert {r.device.name for r in records} == {"dev1"}
            assert gw.metric("tb_gateway_messages_received_total", transport="http") == 6
            assert gw.metric("tb_gateway_ack_latency_seconds_count", transport="http") == 6

    run(loop, main())


def test_200_is_written_only_once_the_sink_confirmed(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()
        async with serving(tmp_path, sink=sink) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            posting = asyncio.create_task(client.post("/api/v1/T1/telemetry", json={"a": 1}))
            done, _ = await asyncio.wait([posting], timeout=0.3)
            assert not done, "answered before the sink confirmed the record"
            assert sink.records == []
            sink.gate.set()
            answer = await asyncio.wait_for(posting, 5)
            assert answer.status_code == 200
            assert [r.values for r in sink.records] == [{"a": 1}]

    run(loop, main())


def test_queue_full_is_503_with_retry_after(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.gate.clear()
        async with (
            serving(tmp_path, sink=sink, queue_max_records=1, retry_after_seconds=7) as gw,
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            first = asyncio.create_task(client.post("/api/v1/T1/telemetry", json={"n": 1}))
            await asyncio.sleep(0.2)  # taken by the pipeline, held at the sink
            second = asyncio.create_task(client.post("/api/v1/T1/telemetry", json={"n": 2}))
            await asyncio.sleep(0.2)  # waits in the queue, which is now full
            refused = await client.post("/api/v1/T1/telemetry", json={"n": 3})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "7"
            assert refused.json() == {"error": "queue_full"}
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="queue_full") == 1
            sink.gate.set()
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            assert [r.values for r in sink.records] == [{"n": 1}, {"n": 2}]

    run(loop, main())


def test_shutting_down_is_503(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.api.pipeline.close()
            answer = await client.post("/api/v1/T1/telemetry", json={"a": 1})
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.json() == {"error": "shutting_down"}

    run(loop, main())


@pytest.mark.parametrize(
    ("failure", "error"),
    [("sink_error", "sink_failed"), ("rejected", "rejected")],
)
def test_sink_failures_are_500(loop: str, tmp_path: Path, failure: str, error: str) -> None:
    async def main() -> None:
        sink = MemorySink()
        if failure == "sink_error":
            sink.fail_with = RetriableSinkError("disk on fire")
        else:
            sink.outcome_for["dev1"] = Outcome.REJECTED
        async with serving(tmp_path, sink=sink) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.post("/api/v1/T1/telemetry", json={"a": 1})
            assert answer.status_code == 500
            assert answer.json() == {"error": error}
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason=error) == 1
            sink.fail_with = None
            sink.outcome_for.clear()
            assert (await client.post("/api/v1/T1/telemetry", json={"a": 2})).status_code == 200

    run(loop, main())


def test_unknown_token_is_401_with_empty_body(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for path in ("/api/v1/NOPE/telemetry", "/api/v1/NOPE/attributes", "/api/v1/NOPE/claim"):
                answer = await client.post(path, content=b'{"a": 1}')
                assert (answer.status_code, answer.content) == (401, b"")
            answer = await client.get("/api/v1/NOPE/attributes")
            assert (answer.status_code, answer.content) == (401, b"")
            # the token is checked before the body: a bad token with a bad body is still 401
            answer = await client.post("/api/v1/NOPE/telemetry", content=b"{not json")
            assert answer.status_code == 401
            assert gw.sink.records == []
            assert gw.metric("tb_gateway_auth_failures_total", transport="http") == 5
            # the connection is kept: a good request follows on it
            assert (await client.post("/api/v1/T1/telemetry", json={"a": 1})).status_code == 200
            assert gw.metric("tb_gateway_connections_total", transport="http") == 1

    run(loop, main())


def test_token_is_checked_on_headers_and_the_body_of_a_bad_token_is_not_kept(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            raw = await Raw.connect(gw.port)
            head = b"POST /api/v1/NOPE/telemetry HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n"
            await raw.send(head + b"x" * 5000)
            await asyncio.sleep(0.2)
            assert gw.metric("tb_gateway_auth_failures_total", transport="http") == 1  # before the body ended
            (connection,) = gw.server.connections
            (pending,) = connection.queue
            assert pending.refusal == 401
            assert pending.body == b""  # what arrived was discarded
            await raw.send(b"x" * 15000)
            status, _, body = await raw.response()
            assert (status, body) == (401, b"")
            await raw.close()

    run(loop, main())


def test_expect_100_continue(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            body = b'{"a": 1}'
            raw = await Raw.connect(gw.port)
            head = b"POST /api/v1/T1/telemetry HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 8\r\n\r\n"
            await raw.send(head)
            status, _, _ = await raw.response()
            assert status == 100
            await raw.send(body)
            assert (await raw.response())[0] == 200
            # refused before the body: the answer comes at once, then the connection closes
            await raw.send(head.replace(b"T1", b"NOPE"))
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (401, "close")
            assert await raw.until_closed() == b""
            await raw.close()
            assert [r.values for r in gw.sink.records] == [{"a": 1}]

    run(loop, main())


@pytest.mark.parametrize(
    ("path", "payload", "where"),
    [
        ("/api/v1/T1/telemetry", b'{"a": ', "invalid JSON"),
        ("/api/v1/T1/telemetry", b"", "empty payload"),
        ("/api/v1/T1/telemetry", b"42", "telemetry: expected a JSON object or array"),
        ("/api/v1/T1/telemetry", b'[{"a": 1}, 7]', "telemetry[1]"),
        ("/api/v1/T1/telemetry", b'{"ts": "soon", "values": {"a": 1}}', "telemetry.ts"),
        ("/api/v1/T1/attributes", b'[{"a": 1}]', "attributes: expected a JSON object"),
        ("/api/v1/T1/attributes", b"nul", "invalid JSON"),
        ("/api/v1/T1/claim", b'{"secretKey": 5}', "claim"),
    ],
)
def test_bad_payload_is_400_with_json_error(loop: str, tmp_path: Path, path: str, payload: bytes, where: str) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.post(path, content=payload)
            assert answer.status_code == 400
            assert answer.headers["content-type"] == "application/json"
            assert where in answer.json()["error"]
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="bad_payload") == 1
            assert gw.sink.records == []
            assert (await client.post(path, json={"ok": 1})).status_code == 200  # same connection goes on

    run(loop, main())


def test_attribute_request(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        tokens = {"T1": "dev1", "T2": "dev2"}
        async with serving(tmp_path, tokens=tokens) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            path = "/api/v1/T1/attributes"
            assert (await client.get(path)).json() == {}  # nothing known: both sections omitted
            assert (await client.post(path, json={"fw": "v1", "n": 3})).status_code == 200
            gw.api.attributes.update("id-dev1", SHARED, {"interval": 10, "mode": "eco"})

            async def get(params: dict[str, Any] | None = None) -> Any:
                answer = await client.get(path, params=params)
                assert answer.status_code == 200
                assert answer.headers["content-type"] == "application/json"
                return orjson.loads(answer.content)

            everything = {"client": {"fw": "v1", "n": 3}, "shared": {"interval": 10, "mode": "eco"}}
            assert await get() == everything
            assert await get({"clientKeys": "", "sharedKeys": ""}) == everything  # empty = absent, as TB
            assert await get({"clientKeys": "fw"}) == {"client": {"fw": "v1"}}
            assert await get({"sharedKeys": "mode,nope"}) == {"shared": {"mode": "eco"}}
            assert await get({"clientKeys": "n, fw", "sharedKeys": "interval"}) == {
                "client": {"n": 3, "fw": "v1"},
                "shared": {"interval": 10},
            }
            assert await get({"clientKeys": "missing"}) == {}
            # the SDK's snake_case names are not TB's: ignored, so everything comes back (spec §7.3)
            assert await get({"client_keys": "fw"}) == everything
            # another device sees only its own
            other = await client.get("/api/v1/T2/attributes")
            assert (other.status_code, other.json()) == (200, {})

    run(loop, main())


def test_a_device_reads_back_only_acknowledged_attributes(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        sink.outcome_for["dev1"] = Outcome.REJECTED
        async with serving(tmp_path, sink=sink) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.post("/api/v1/T1/attributes", json={"fw": "v2"})).status_code == 500
            assert (await client.get("/api/v1/T1/attributes")).json() == {}

    run(loop, main())


def test_health(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        state: dict[str, Any] = {"ok": True}

        def health() -> tuple[bool, dict[str, Any]]:
            body = {"status": "up" if state["ok"] else "down", "components": {"sink": {"status": "x"}}}
            return state["ok"], body

        async with serving(tmp_path, health=health) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.get("/health")
            assert (answer.status_code, answer.json()["status"]) == (200, "up")
            assert answer.json()["components"] == {"sink": {"status": "x"}}
            state["ok"] = False
            answer = await client.get("/health")
            assert (answer.status_code, answer.json()["status"]) == (503, "down")
            answer = await client.post("/health")
            assert (answer.status_code, answer.headers["allow"]) == (405, "GET")

    run(loop, main())


def test_404_and_405(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for path in ("/", "/api/v1/T1/nothing", "/api/v1/T1/rpc/1/x", "/api/v1/T1/attributes/updates/x"):
                answer = await client.post(path, json={"a": 1})
                assert (answer.status_code, answer.content) == (404, b""), path
            answer = await client.get("/api/v1/T1/telemetry")
            assert (answer.status_code, answer.headers["allow"]) == (405, "POST")
            answer = await client.put("/api/v1/T1/attributes", json={"a": 1})
            assert (answer.status_code, answer.headers["allow"]) == (405, "GET, POST")
            # a wrong method is 405 whatever the token: the path decides, nothing is looked up
            answer = await client.delete("/api/v1/NOPE/claim")
            assert answer.status_code == 405
            assert gw.metric("tb_gateway_auth_failures_total", transport="http") == 0
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="not_found") == 4
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="method_not_allowed") == 3
            assert gw.metric("tb_gateway_connections_total", transport="http") == 1  # all on one connection
            assert gw.sink.records == []

    run(loop, main())


def test_413_by_content_length(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_payload_size=1000) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                fits = b'{"s": "' + b"x" * 991 + b'"}'
                assert len(fits) == 1000
                assert (await client.post("/api/v1/T1/telemetry", content=fits)).status_code == 200
                answer = await client.post("/api/v1/T1/telemetry", content=fits + b" ")
                assert (answer.status_code, answer.headers["connection"]) == (413, "close")
            # decided on the headers: the body is never read, even for an unknown token or path
            for path in ("/api/v1/NOPE/telemetry", "/nowhere"):
                raw = await Raw.connect(gw.port)
                await raw.send(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n" % path.encode())
                status, headers, _ = await raw.response()
                assert (status, headers["connection"]) == (413, "close")
                assert await raw.until_closed() == b""
                await raw.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="too_large") == 3
            assert gw.metric("tb_gateway_auth_failures_total", transport="http") == 0
            assert len(gw.sink.records) == 1

    run(loop, main())


def test_413_for_a_chunked_body_as_it_streams(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_payload_size=1000) as gw:
            raw = await Raw.connect(gw.port)
            head = b"POST /api/v1/T1/telemetry HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            await raw.send(head + b'8\r\n{"a": 1}\r\n0\r\n\r\n')  # a small chunked body is fine
            assert (await raw.response())[0] == 200
            await raw.send(head + b"258\r\n" + b"x" * 600 + b"\r\n")
            await asyncio.sleep(0.1)
            await raw.send(b"258\r\n" + b"x" * 600 + b"\r\n")  # 1200 bytes: over the limit mid-stream
            status, headers, _ = await raw.response()
            assert (status, headers["connection"]) == (413, "close")
            await raw.send(b"258\r\n" + b"x" * 600 + b"\r\n")  # still sending: discarded, no reset
            assert await raw.until_closed() == b""
            await raw.close()
            assert [r.values for r in gw.sink.records] == [{"a": 1}]

    run(loop, main())


class SlowSource:
    """A credential source that answers only when released (a backend lookup in flight), or fails."""

    name = "slow"

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.fail_with = fail_with

    async def lookup(self, credentials: Credentials) -> DeviceIdentity | None:
        self.calls += 1
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if isinstance(credentials, AccessToken) and credentials.token == "T1":
            return DeviceIdentity("id-dev1", "dev1")
        return None


def _use(gw: Running, source: SlowSource) -> None:
    gw.api.auth = AuthService([source], gw.api.metrics, ttl_s=60.0, negative_ttl_s=1.0)


def test_reading_pauses_while_an_unknown_token_is_looked_up(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw:
            source = SlowSource()
            _use(gw, source)
            raw = await Raw.connect(gw.port)
            await raw.send(b"POST /api/v1/T1/telemetry HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n{")
            await asyncio.sleep(0.1)
            (connection,) = gw.server.connections
            assert source.calls == 1  # asked on the headers, before the body is complete
            assert connection.paused  # and nothing more is read meanwhile
            await raw.send(b'"a": 1}')
            await asyncio.sleep(0.1)
            assert gw.sink.records == []
            source.release.set()
            assert (await raw.response())[0] == 200
            assert connection.paused is False
            await raw.send(request("POST", "/api/v1/T1/telemetry", b'{"a": 2}'))  # now from the cache
            assert (await raw.response())[0] == 200
            assert source.calls == 1
            await raw.send(request("POST", "/api/v1/T9/telemetry", b'{"a": 3}'))
            assert (await raw.response())[0] == 401
            await raw.close()
            assert [r.values for r in gw.sink.records] == [{"a": 1}, {"a": 2}]

    run(loop, main())


@pytest.mark.parametrize(
    ("failure", "status", "reason"),
    [(CredentialsUnavailable("backend down"), 503, "auth_unavailable"), (RuntimeError("bug"), 500, None)],
)
def test_a_failed_token_lookup(loop: str, tmp_path: Path, failure: Exception, status: int, reason: str | None) -> None:
    async def main() -> None:
        async with serving(tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            source = SlowSource(failure)
            source.release.set()
            _use(gw, source)
            answer = await client.post("/api/v1/T1/telemetry", json={"a": 1})
            assert answer.status_code == status
            assert "error" in answer.json()
            if reason:
                assert answer.headers["retry-after"] == "1"
                assert gw.metric("tb_gateway_refusals_total", transport="http", reason=reason) == 1
            else:
                assert gw.metric("tb_gateway_errors_total", component="auth") == 1
            assert gw.sink.records == []
            assert (await client.get("/health")).status_code == 200  # the connection goes on

    run(loop, main())


def test_a_failing_handler_answers_500_and_the_connection_goes_on(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        def health() -> tuple[bool, dict[str, Any]]:
            raise RuntimeError("health check bug")

        async with serving(tmp_path, health=health) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.get("/health")
            assert (answer.status_code, answer.json()) == (500, {"error": "internal error"})
            assert gw.metric("tb_gateway_errors_total", component="http") == 1
            assert (await client.post("/api/v1/T1/telemetry", json={"a": 1})).status_code == 200
            assert gw.metric("tb_gateway_connections_total", transport="http") == 1

    run(loop, main())
