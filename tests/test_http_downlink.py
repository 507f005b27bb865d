"""The HTTP downlink endpoints in process (docs/device-api.md, docs/downlink.md): how long polls end and what
the downlink endpoints' refusals count. End to end with curl: tests/test_downlink_http.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from tb_gateway.records import RecordKind
from tests.http_support import Raw, request, run, serving

pytestmark = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])

DEVICE_ID = "id-dev1"  # tests.support.TokenSource: token T1 -> device dev1


def test_downlink_400s_are_counted_as_refusals(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            raw = await Raw.connect(gw.port)
            for data in (
                request("POST", "/api/v1/T1/rpc", b"{"),  # client RPC: not JSON
                request("POST", "/api/v1/T1/rpc", b"[]"),  # client RPC: not {"method","params"}
                request("GET", "/api/v1/T1/rpc?timeout=abc"),
                request("GET", "/api/v1/T1/attributes/updates?timeout=-5"),
                request("POST", "/api/v1/T1/rpc/abc", b"{}"),  # an RPC reply to a non-integer id
            ):
                await raw.send(data)
                assert (await raw.response())[0] == 400
            await raw.close()
            refusals = "tb_gateway_refusals_total"
            assert gw.metric(refusals, transport="http", reason="bad_payload") == 2
            assert gw.metric(refusals, transport="http", reason="bad_request") == 3

    run(loop, main())


def test_a_long_poll_holds_its_device_here_while_it_waits(loop: str, tmp_path: Path) -> None:
    """docs/downlink.md: a device's first session (a long poll too) makes this process its holder, so an
    RPC read by another process is handed over here; the last one to go releases it."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            hub = gw.api.downlink
            assert hub is not None
            holds: list[tuple[str, bool]] = []
            hub.hold_listeners.append(lambda device, held: holds.append((device.name, held)))
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/api/v1/T1/rpc?timeout=300"))
            await asyncio.sleep(0.1)
            assert holds == [("dev1", True)] and hub.sessions.holds(DEVICE_ID)
            assert (await raw.response())[0] == 408
            assert holds == [("dev1", True), ("dev1", False)] and not hub.sessions.holds(DEVICE_ID)
            await raw.close()

    run(loop, main())


def test_a_poll_ended_by_shutdown_closes_the_connection(loop: str, tmp_path: Path) -> None:
    """The app closes the hub (polls answer 503) before the connections drain: the 503 says Connection: close,
    and when to try again."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/api/v1/T1/rpc?timeout=20000"))
            await asyncio.sleep(0.1)
            gw.server.stop_accepting()
            assert gw.api.downlink is not None
            gw.api.downlink.close()
            status, headers, body = await raw.response()
            assert (status, headers.get("connection"), body) == (503, "close", b'{"error":"shutting down"}')
            assert headers.get("retry-after") == str(gw.api.settings.retry_after_seconds)  # as every 503
            assert await raw.until_closed() == b""
            await raw.close()

    run(loop, main())


def test_a_half_closed_poll_is_withdrawn_and_told_why(loop: str, tmp_path: Path) -> None:
    """EOF ends a poll at once (a client that left must not be handed an RPC), but with a true answer: a
    client that only half-closed reads 400 saying why, not 503 "shutting down"."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            hub = gw.api.downlink
            assert hub is not None
            for path in ("/api/v1/T1/rpc?timeout=5000", "/api/v1/T1/attributes/updates?timeout=5000"):
                raw = await Raw.connect(gw.port)
                await raw.send(request("GET", path))
                await asyncio.sleep(0.05)
                raw.writer.write_eof()
                status, headers, body = await raw.response(within_s=1.0)
                assert (status, headers.get("connection")) == (400, "close")
                assert b"closed its side of the connection" in body
                assert await raw.until_closed() == b""
                await raw.close()
            assert gw.metric("tb_gateway_refusals_total", transport="http", reason="shutting_down") == 0
            # the RPC sent now waits for the next poll: nothing was handed to the withdrawn one
            rpc, _ = hub.send_rpc(DEVICE_ID, "reboot", {"delay": 1})
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/api/v1/T1/rpc?timeout=5000"))
            status, _, body = await raw.response()
            assert (status, orjson.loads(body)) == (200, {"id": rpc.id, "method": "reboot", "params": {"delay": 1}})
            await raw.close()

    run(loop, main())


def test_a_poll_of_a_removed_device_is_answered_401(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            hub = gw.api.downlink
            assert hub is not None
            raw = await Raw.connect(gw.port)
            await raw.send(request("GET", "/api/v1/T1/rpc?timeout=5000"))
            await asyncio.sleep(0.1)
            for session in list(hub.sessions.sessions(DEVICE_ID)):  # what app.py does on a removal
                session.close("revoked")
            assert (await raw.response())[0] == 401
            await raw.close()

    run(loop, main())


def test_a_client_rpc_whose_client_sent_eof_is_withdrawn_and_the_connection_closes(loop: str, tmp_path: Path) -> None:
    """A client-side RPC waits for the backend up to CLIENT_SIDE_RPC_TIMEOUT_SECONDS; a client that sends EOF
    meanwhile is no longer waited for: the connection answers 400 and closes at once (no fd or connection slot
    held for a minute), the backend's late reply is dropped, and nothing counts as a refusal."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as gw:
            hub = gw.api.downlink
            assert hub is not None
            body = b'{"method":"getTime","params":{}}'
            # answered on a keep-alive connection: the reply still comes back
            raw = await Raw.connect(gw.port)
            await raw.send(request("POST", "/api/v1/T1/rpc", body))
            await asyncio.sleep(0.1)
            (request_id,) = hub.client_rpc_table._pending
            assert hub.client_rpc_reply(request_id, {"time": 1})
            status, _, answer = await raw.response()
            assert (status, orjson.loads(answer)) == (200, {"time": 1})
            # then one the client leaves (EOF) while it waits
            await raw.send(request("POST", "/api/v1/T1/rpc", body))
            await asyncio.sleep(0.1)
            (request_id,) = hub.client_rpc_table._pending
            raw.writer.write_eof()
            status, headers, answer = await raw.response(within_s=1.0)
            assert (status, headers.get("connection")) == (400, "close")
            assert b"closed its side of the connection" in answer
            assert await raw.until_closed(within_s=1.0) == b""
            await raw.close()
            await asyncio.sleep(0.05)
            assert len(hub.client_rpc_table) == 0 and hub._client_waiters == {}
            assert not hub.client_rpc_reply(request_id, {"time": 2})  # late: dropped
            assert not gw.server.connections
            refusals = "tb_gateway_refusals_total"
            for reason in ("bad_request", "bad_payload", "shutting_down"):
                assert gw.metric(refusals, transport="http", reason=reason) == 0
            requests = [r for r in gw.sink.records if r.kind is RecordKind.RPC_REQUEST]
            assert len(requests) == 2  # the withdrawn one had reached the pipeline already

    run(loop, main())
