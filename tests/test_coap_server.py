"""CoAP adapter over real UDP sockets on 127.0.0.1, wired in-process to DeviceApi, a pipeline and a memory sink.

A raw client (encode/decode with our codec) gives byte-level control; aiocoap's client checks interop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import orjson
import pytest
import uvloop

from tb_gateway.coap import sockets
from tb_gateway.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    Block,
    Code,
    Message,
    Option,
    decode,
    decode_uint,
    encode,
    encode_uint,
)
from tb_gateway.coap.downlink import merge_updates
from tb_gateway.coap.endpoint import EndpointConfig
from tb_gateway.coap.server import CoapServer
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.rpc import RpcStatus
from tb_gateway.downlink.shared_attributes import SharedChange
from tb_gateway.errors import CredentialsUnavailable
from tb_gateway.records import RecordKind
from tb_gateway.sinks.base import Outcome
from tests.support import MemorySink, PollOnlySink, make_api

TOKEN = "A1_TEST_TOKEN"


def path(*segments: str) -> tuple[tuple[int, bytes], ...]:
    return tuple((Option.URI_PATH, s.encode()) for s in segments)


TELEMETRY = path("api", "v1", TOKEN, "telemetry")
ATTRIBUTES = path("api", "v1", TOKEN, "attributes")


class Client(asyncio.DatagramProtocol):
    """A raw CoAP client socket: send Messages, receive decoded Messages."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = 100

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass

    @classmethod
    async def open(cls, port: int) -> Client:
        _, client = await asyncio.get_running_loop().create_datagram_endpoint(cls, remote_addr=("127.0.0.1", port))
        return client

    def send(self, message: Message | bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(message if isinstance(message, bytes) else encode(message))

    def request(
        self, code: int = Code.POST, options: Any = TELEMETRY, payload: bytes = b'{"temperature":25}', mtype: int = CON
    ) -> Message:
        self.mid += 1
        message = Message(mtype, code, self.mid, self.mid.to_bytes(2, "big"), options, payload)
        self.send(message)
        return message

    async def recv(self, within: float = 3.0) -> Message:
        return decode(await asyncio.wait_for(self.inbox.get(), within))

    async def silent(self, within: float = 0.2) -> None:
        await asyncio.sleep(within)
        assert self.inbox.empty(), decode(self.inbox.get_nowait())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    sink: MemorySink | None = None,
    config: EndpointConfig | None = None,
    max_pending: int = 10_000,
    downlink: bool = False,
    **settings: Any,
) -> AsyncIterator[tuple[Any, CoapServer, Client, MemorySink]]:
    sink = sink or MemorySink()
    api = make_api(tmp_path, sink, {TOKEN: "thermostat-1", "T2": "meter-2"}, **settings)
    if downlink:  # RPC and shared attributes (coap/downlink.py), as app.py wires them
        api.downlink = Downlink(
            api.attributes, api.metrics, submit=api.pipeline.submit, session_limits=api.session_limits, instance="t"
        )
    server = CoapServer(api, host="127.0.0.1", port=0, config=config, max_pending=max_pending)
    pipeline = asyncio.create_task(api.pipeline.run())
    await server.start()
    client = await Client.open(server.port)
    try:
        yield api, server, client, sink
    finally:
        client.close()
        sink.gate.set()
        server.stop_accepting()
        await asyncio.wait_for(server.drain(), 5)
        api.pipeline.close()
        await asyncio.wait_for(pipeline, 5)
        api.attributes.close()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(params=["batched", "asyncio transport"])
def each_socket_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's socket is batched through the C fast path when it is built, else an asyncio transport
    (coap/sockets.py): the tests marked with this run on both."""
    if request.param != "batched":
        monkeypatch.setattr(sockets, "_speedups", None)


# ---------------------------------------------------------------- uplink


@pytest.mark.usefixtures("each_socket_kind")
def test_con_post_telemetry_gets_piggybacked_2_01_only_after_the_sink_confirmed(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, sink):
            sink.gate.clear()
            sent = client.request()
            await client.silent(0.2)  # the sink has not confirmed: no ACK yet (window is 500 ms)
            sink.gate.set()
            reply = await client.recv()
            assert (reply.type, reply.code, reply.mid, reply.token) == (ACK, Code.CREATED, sent.mid, sent.token)
            [record] = sink.records
            assert (record.device.name, record.kind, record.values) == (
                "thermostat-1",
                RecordKind.TELEMETRY,
                {"temperature": 25},
            )
            assert record.transport.value == "coap"
            assert api.metrics.ack_latency.labels(transport="coap").sum > 0

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_a_durable_batch_is_answered_at_the_next_datagrams_read(tmp_path: Path) -> None:
    """Each read polls the pipeline: a 2.01 does not wait for the loop's pass over the sockets to end."""

    async def main() -> None:
        async with serving(tmp_path, PollOnlySink()) as (_, server, client, sink):
            sent = client.request()
            await client.silent(0.2)  # durable (per this sink) but nobody polled yet
            assert len(sink.batches) == 1
            other = await Client.open(server.port)
            try:
                other.send(Message(CON, Code.EMPTY, 7, b"", (), b""))  # a ping: answered with a RST
                assert (await other.recv()).type == RST
                reply = await client.recv()
                assert (reply.type, reply.code, reply.mid) == (ACK, Code.CREATED, sent.mid)
            finally:
                other.close()

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_non_post_gets_non_2_01_with_its_own_message_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _, client, sink):
            sent = client.request(mtype=NON, payload=b'[{"ts":1700000000000,"values":{"a":1}},{"b":true}]')
            reply = await client.recv()
            assert (reply.type, reply.code, reply.token) == (NON, Code.CREATED, sent.token)
            assert reply.mid != sent.mid
            assert (sink.records[0].ts, sink.records[0].values) == (1700000000000, {"a": 1})
            assert sink.records[1].values == {"b": True}

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_retransmitted_con_is_answered_again_but_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _, client, sink):
            sent = client.request()
            first = await client.recv()
            client.send(sent)
            assert await client.recv() == first
            await client.silent(0.1)
            assert len(sink.records) == 1

    run(main())


def test_attributes_post_then_get_with_client_and_shared_keys(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, sink):
            client.request(options=ATTRIBUTES, payload=b'{"firmware":"v1.2","mode":"eco"}')
            assert (await client.recv()).code == Code.CREATED
            assert sink.records[0].kind is RecordKind.ATTRIBUTES
            api.attributes.update("id-thermostat-1", "shared", {"target": 21})
            query = ((Option.URI_QUERY, b"clientKeys=firmware,missing"), (Option.URI_QUERY, b"sharedKeys=target"))
            client.request(Code.GET, (*ATTRIBUTES, *query), b"")
            reply = await client.recv()
            assert reply.code == Code.CONTENT
            assert decode_uint(reply.option(Option.CONTENT_FORMAT) or b"") == 50
            assert orjson.loads(reply.payload) == {"client": {"firmware": "v1.2"}, "shared": {"target": 21}}
            client.request(Code.GET, (*ATTRIBUTES, (Option.URI_QUERY, b"sharedKeys=nope")), b"")
            assert (await client.recv()).code == Code.NOT_FOUND

    run(main())


def test_claim_post_gets_2_01_and_a_claim_record(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _, client, sink):
            client.request(options=path("api", "v1", TOKEN, "claim"), payload=b'{"secretKey":"s","durationMs":60000}')
            assert (await client.recv()).code == Code.CREATED
            assert (sink.records[0].kind, sink.records[0].values) == (
                RecordKind.CLAIM,
                {"secretKey": "s", "durationMs": 60000},
            )
            client.request(options=path("api", "v1", TOKEN, "claim"), payload=b"")
            assert (await client.recv()).code == Code.CREATED

    run(main())


def test_error_answers(tmp_path: Path) -> None:
    cases = [
        ("unknown token", Code.POST, path("api", "v1", "nope", "telemetry"), b"{}", Code.UNAUTHORIZED),
        ("bad JSON", Code.POST, TELEMETRY, b"{not json", Code.BAD_REQUEST),
        ("attributes not an object", Code.POST, ATTRIBUTES, b"[1]", Code.BAD_REQUEST),
        ("GET on telemetry (ThingsBoard: 4.00)", Code.GET, TELEMETRY, b"", Code.BAD_REQUEST),
        ("PUT", Code.PUT, TELEMETRY, b"{}", Code.METHOD_NOT_ALLOWED),
        ("DELETE", Code.DELETE, ATTRIBUTES, b"", Code.METHOD_NOT_ALLOWED),
        ("outside /api/v1", Code.POST, path("foo"), b"{}", Code.NOT_FOUND),
        ("unknown feature", Code.POST, path("api", "v1", TOKEN, "nonsense"), b"{}", Code.BAD_REQUEST),
        ("no feature", Code.POST, path("api", "v1", TOKEN), b"{}", Code.BAD_REQUEST),
        ("no path", Code.POST, (), b"{}", Code.NOT_FOUND),
        ("no token (spec §4: 4.01)", Code.POST, path("api", "v1", "telemetry"), b"{}", Code.UNAUTHORIZED),
        ("no token, GET", Code.GET, path("api", "v1", "attributes"), b"", Code.UNAUTHORIZED),
    ]

    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, sink):
            for name, method, options, payload, expected in cases:
                sent = client.request(method, options, payload)
                reply = await client.recv()
                assert (reply.code, reply.mid, reply.type) == (expected, sent.mid, ACK), name
            assert sink.records == []
            assert api.metrics.auth_failures.labels(transport="coap")._value.get() == 3

    run(main())


def refusals(api: Any) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for metric in api.metrics.refusals.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["transport"] == "coap"
    }


def test_every_refusal_is_counted_with_its_reason(tmp_path: Path) -> None:
    block = Block(0, True, 6).encode()
    cases = [
        (Code.POST, path("foo"), b"{}", Code.NOT_FOUND, "not_found"),
        (Code.POST, path("api", "v1", TOKEN, "nonsense"), b"{}", Code.BAD_REQUEST, "bad_request"),
        (Code.PUT, TELEMETRY, b"{}", Code.METHOD_NOT_ALLOWED, "method_not_allowed"),
        (Code.POST, (*TELEMETRY, (9, b"")), b"{}", Code.BAD_OPTION, "bad_option"),
        (Code.POST, (*TELEMETRY, (Option.PROXY_URI, b"coap://x/")), b"{}", Code.PROXYING_NOT_SUPPORTED, None),
        (
            Code.POST,
            (*TELEMETRY, (Option.BLOCK1, Block(1, True, 6).encode())),
            b"x" * 1024,
            Code.REQUEST_ENTITY_INCOMPLETE,
            "incomplete",
        ),
        (Code.POST, (*TELEMETRY, (Option.BLOCK1, block)), b"x" * 100, Code.BAD_REQUEST, "bad_request"),
        (
            Code.POST,
            (*TELEMETRY, (Option.BLOCK1, block), (Option.SIZE1, encode_uint(10**6))),
            b"x" * 1024,
            Code.REQUEST_ENTITY_TOO_LARGE,
            "too_large",
        ),
        (Code.GET, (*ATTRIBUTES, (Option.ACCEPT, encode_uint(60))), b"", Code.NOT_ACCEPTABLE, "not_acceptable"),
        (Code.GET, ATTRIBUTES, b"", Code.NOT_FOUND, "not_found"),  # nothing found
        (Code.POST, TELEMETRY, b"{not json", Code.BAD_REQUEST, "bad_payload"),
    ]

    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, sink):
            expected: dict[str, float] = {"proxying_not_supported": 1}
            for method, options, payload, code, reason in cases:
                sent = client.request(method, options, payload)
                reply = await client.recv()
                assert (reply.mid, reply.code) == (sent.mid, code), (options, reason)
                if reason is not None:
                    expected[reason] = expected.get(reason, 0) + 1
            assert refusals(api) == expected
            assert sink.records == []

    run(main())


def test_content_answers_are_json_only_an_other_accept_is_4_06(tmp_path: Path) -> None:
    """RFC 7252 §5.10.4; only JSON (50) is produced, so text/plain (0) and CBOR (60) are not acceptable."""

    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, _):
            api.attributes.update("id-thermostat-1", "shared", {"interval": 5})
            for accept, code in ((0, Code.NOT_ACCEPTABLE), (60, Code.NOT_ACCEPTABLE), (50, Code.CONTENT)):
                client.request(Code.GET, (*ATTRIBUTES, (Option.ACCEPT, encode_uint(accept))), b"")
                assert (await client.recv()).code == code, accept
            client.request(Code.GET, ATTRIBUTES, b"")  # no Accept: JSON
            assert (await client.recv()).code == Code.CONTENT
            client.request(Code.POST, (*TELEMETRY, (Option.ACCEPT, encode_uint(0))))  # 2.01 has no content
            assert (await client.recv()).code == Code.CREATED

    run(main())


def test_too_large_is_4_13_with_size1(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_payload_size=100) as (api, _, client, sink):
            client.request(payload=b'{"k":"' + b"x" * 200 + b'"}')
            reply = await client.recv()
            assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert decode_uint(reply.option(Option.SIZE1) or b"") == 100
            assert sink.records == []
            assert api.metrics.refusals.labels(transport="coap", reason="too_large")._value.get() == 1

    run(main())


def test_pipeline_full_and_spool_full_are_5_03_with_max_age(tmp_path: Path) -> None:
    async def main() -> None:
        sink = MemorySink()
        async with serving(tmp_path, sink, queue_max_records=1, retry_after_seconds=7) as (api, _, client, _):
            sink.gate.clear()  # first message in the sink, second queued, third refused
            client.request(mtype=NON)
            await asyncio.sleep(0.05)
            client.request(mtype=NON)
            third = client.request()
            reply = await client.recv()
            assert (reply.code, reply.mid) == (Code.SERVICE_UNAVAILABLE, third.mid)
            assert decode_uint(reply.option(Option.MAX_AGE) or b"") == 7
            sink.gate.set()
            assert [(await client.recv()).code for _ in range(2)] == [Code.CREATED, Code.CREATED]
            sink.outcome_for["thermostat-1"] = Outcome.SPOOL_FULL
            client.request()
            reply = await client.recv()
            assert reply.code == Code.SERVICE_UNAVAILABLE and decode_uint(reply.option(Option.MAX_AGE) or b"") == 7
            sink.outcome_for["thermostat-1"] = Outcome.REJECTED
            client.request()
            assert (await client.recv()).code == Code.INTERNAL_SERVER_ERROR
            refusals = api.metrics.refusals
            assert refusals.labels(transport="coap", reason="queue_full")._value.get() == 1
            assert refusals.labels(transport="coap", reason="spool_full")._value.get() == 1

    run(main())


def test_slow_sink_gets_empty_ack_then_separate_con_2_01_retransmitted_until_acked(tmp_path: Path) -> None:
    async def main() -> None:
        config = EndpointConfig(piggyback_timeout_s=0.1, ack_timeout_s=0.2, housekeeping_s=0.05)
        async with serving(tmp_path, config=config) as (_, server, client, sink):
            sink.gate.clear()
            sent = client.request()
            empty = await client.recv()
            assert (empty.type, empty.code, empty.mid) == (ACK, Code.EMPTY, sent.mid)
            sink.gate.set()
            separate = await client.recv()
            assert (separate.type, separate.code, separate.token) == (CON, Code.CREATED, sent.token)
            again = await client.recv()  # not ACKed: retransmitted
            assert again == separate
            client.send(Message(ACK, Code.EMPTY, separate.mid))
            await client.silent(0.7)
            assert server.endpoint.stats()["outgoing"] == 0
            assert len(sink.records) == 1

    run(main())


def test_piggyback_window_comes_from_the_setting(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, coap_piggyback_timeout_ms=50) as (_, server, client, sink):
            assert server.endpoint.config.piggyback_timeout_s == 0.05
            sink.gate.clear()
            client.request()
            assert (await client.recv(1.0)).code == Code.EMPTY

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_block1_upload_over_raw_sockets(tmp_path: Path) -> None:
    async def main() -> None:
        body = json.dumps({f"key{i}": i for i in range(200)}).encode()  # ~2.4 KB: three 1024-byte blocks
        async with serving(tmp_path) as (_, _, client, sink):
            blocks = [body[i : i + 1024] for i in range(0, len(body), 1024)]
            for num, chunk in enumerate(blocks):
                more = num < len(blocks) - 1
                client.request(options=(*TELEMETRY, (Option.BLOCK1, Block(num, more, 6).encode())), payload=chunk)
                reply = await client.recv()
                assert reply.code == (Code.CONTINUE if more else Code.CREATED)
                assert Block.decode(reply.option(Option.BLOCK1) or b"") == Block(num, more, 6)
            [record] = sink.records
            assert record.values == {f"key{i}": i for i in range(200)}

    run(main())


def test_block1_upload_larger_than_max_payload_is_4_13(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_payload_size=1500) as (_, _, client, sink):
            client.request(options=(*TELEMETRY, (Option.BLOCK1, Block(0, True, 6).encode())), payload=b"x" * 1024)
            assert (await client.recv()).code == Code.CONTINUE
            client.request(options=(*TELEMETRY, (Option.BLOCK1, Block(1, True, 6).encode())), payload=b"x" * 1024)
            reply = await client.recv()
            assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert decode_uint(reply.option(Option.SIZE1) or b"") == 1500
            assert sink.records == []

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_aiocoap_client_con_non_and_blockwise(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server, _, sink):
            context = await aiocoap.Context.create_client_context()
            try:
                uri = f"coap://127.0.0.1:{server.port}/api/v1/{TOKEN}/telemetry"
                response = await context.request(
                    aiocoap.Message(code=aiocoap.POST, uri=uri, payload=b'{"x":1}')
                ).response
                assert response.code == aiocoap.CREATED
                message = aiocoap.Message(
                    code=aiocoap.POST, uri=uri, payload=b'{"x":2}', transport_tuning=aiocoap.Unreliable
                )
                response = await context.request(message).response
                assert response.code == aiocoap.CREATED
                big = json.dumps({f"k{i}": "v" * 20 for i in range(150)}).encode()
                assert len(big) > 3000
                response = await context.request(aiocoap.Message(code=aiocoap.POST, uri=uri, payload=big)).response
                assert response.code == aiocoap.CREATED
                bad = f"coap://127.0.0.1:{server.port}/api/v1/wrong/telemetry"
                response = await context.request(aiocoap.Message(code=aiocoap.POST, uri=bad, payload=b"{}")).response
                assert response.code == aiocoap.UNAUTHORIZED
            finally:
                await context.shutdown()
            values = [r.values for r in sink.records]
            assert values[:2] == [{"x": 1}, {"x": 2}]
            assert values[2] == {f"k{i}": "v" * 20 for i in range(150)}

    run(main())


# ---------------------------------------------------------------- robustness


@pytest.mark.usefixtures("each_socket_kind")
def test_malformed_datagrams_reset_or_ignored_and_service_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _, client, _):
            client.send(bytes.fromhex("40010031f1"))  # CON with reserved option delta 15
            reset = await client.recv()
            assert (reset.type, reset.mid) == (RST, 0x31)
            for garbage in (b"", b"\x00", b"\xff" * 30, bytes.fromhex("50010032f1"), bytes.fromhex("4900")):
                client.send(garbage)
            client.send(Message(CON, Code.EMPTY, 0x99))  # ping
            assert (await client.recv()).type == RST
            await client.silent(0.1)
            client.request()
            assert (await client.recv()).code == Code.CREATED

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_reply_to_a_closed_port_does_not_stop_the_server(tmp_path: Path, loop_factory: Any) -> None:
    """aiocoap's server stops reading after an ICMP port-unreachable on uvloop (DESIGN.md §3); ours must not."""

    async def main() -> None:
        async with serving(tmp_path) as (_, server, client, sink):
            sink.gate.clear()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                gone.sendto(encode(Message(CON, Code.POST, 1, b"g", TELEMETRY, b'{"a":1}')), ("127.0.0.1", server.port))
                await asyncio.sleep(0.05)
            sink.gate.set()  # the reply goes to a closed port -> ICMP unreachable
            await asyncio.sleep(0.1)
            for _ in range(3):
                client.request()
                assert (await client.recv()).code == Code.CREATED

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(main(), 60))


def test_memory_stays_bounded_under_a_flood_of_ids_tokens_and_addresses(tmp_path: Path) -> None:
    async def main() -> None:
        config = EndpointConfig(max_exchanges=300, max_block_transfers=10)
        async with serving(tmp_path, config=config) as (_, server, _, sink):
            socks = []
            for _ in range(25):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                socks.append(s)
            try:
                sent = 0
                for i in range(4000):
                    s = socks[i % len(socks)]
                    if i % 4 == 0:  # block uploads that are never finished
                        options = (*TELEMETRY, (Option.BLOCK1, Block(0, True, 0).encode()))
                        payload = b"x" * 16
                    else:
                        options, payload = TELEMETRY, b'{"n":%d}' % i
                    message = Message(
                        CON if i % 2 else NON, Code.POST, i & 0xFFFF, i.to_bytes(4, "big"), options, payload
                    )
                    with contextlib.suppress(BlockingIOError):
                        s.sendto(encode(message), ("127.0.0.1", server.port))
                        sent += 1
                    if i % 200 == 0:
                        await asyncio.sleep(0.01)
                for _ in range(200):
                    await asyncio.sleep(0.02)
                    if server.pending == 0 and len(sink.records) > 0:
                        break
                stats = server.endpoint.stats()
                assert stats["exchanges"] <= 300
                assert stats["block_transfers"] <= 10
                assert server.pending == 0
                assert len(sink.records) > 1000
            finally:
                for s in socks:
                    s.close()

    run(main())


def test_the_route_cache_stays_bounded_and_routes_each_shape_by_its_own_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tb_gateway.coap import server as coap_server

    monkeypatch.setattr(coap_server, "ROUTE_CACHE", 8)

    async def main() -> None:
        async with serving(tmp_path) as (_, server, client, sink):
            answers = []
            for n in range(30):  # distinct shapes: paths with other tokens, other features, other methods
                shape = n % 3
                options = path("api", "v1", TOKEN if shape else f"NOPE{n}", "telemetry" if shape != 2 else "nowhere")
                client.request(Code.POST, options, b'{"n":%d}' % n)
                answers.append((await client.recv()).code)
                assert len(server._routes) <= 8
            assert answers == [Code.UNAUTHORIZED, Code.CREATED, Code.BAD_REQUEST] * 10
            assert [r.values["n"] for r in sink.records] == list(range(1, 30, 3))

    run(main())


def test_stop_accepting_refuses_new_requests_and_drain_answers_admitted_ones(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server, client, sink):
            sink.gate.clear()
            admitted = client.request()
            await asyncio.sleep(0.05)
            server.stop_accepting()
            refused = client.request()
            reply = await client.recv()
            assert (reply.mid, reply.code) == (refused.mid, Code.SERVICE_UNAVAILABLE)
            drained = asyncio.create_task(server.drain())
            await asyncio.sleep(0.05)
            assert not drained.done()
            sink.gate.set()
            reply = await client.recv()
            assert (reply.mid, reply.code) == (admitted.mid, Code.CREATED)
            await asyncio.wait_for(drained, 2)

    run(main())


def test_unknown_token_lookup_that_suspends_is_finished_by_a_task(tmp_path: Path) -> None:
    """A cache miss makes authenticate really wait (the source is async); the request must still be answered."""

    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, _):
            source = api.auth._sources[0]
            original = source.lookup

            async def slow_lookup(credentials: Any) -> Any:
                await asyncio.sleep(0.05)
                return await original(credentials)

            source.lookup = slow_lookup
            client.request(options=path("api", "v1", "T2", "telemetry"))
            assert (await client.recv()).code == Code.CREATED
            client.request(options=path("api", "v1", "unknown", "telemetry"))
            assert (await client.recv()).code == Code.UNAUTHORIZED

    run(main())


def test_a_credential_lookup_that_uses_asyncio_timeout_runs_in_a_task(tmp_path: Path) -> None:
    """Redis' client wraps each command in ``asyncio.timeout``, which raises outside a Task: a cache miss must
    not be stepped inline from the socket callback (it was answered 5.00, and Redis declared down)."""

    async def main() -> None:
        async with serving(tmp_path) as (api, _, client, _):
            source = api.auth._sources[0]
            original = source.lookup

            async def lookup(credentials: Any) -> Any:
                async with asyncio.timeout(1):
                    return await original(credentials)

            source.lookup = lookup
            client.request(options=path("api", "v1", "T2", "telemetry"))
            assert (await client.recv()).code == Code.CREATED
            assert api.metrics.errors.labels(component="coap")._value.get() == 0

    run(main())


@pytest.mark.usefixtures("each_socket_kind")
def test_drain_cut_short_by_the_shutdown_timeout_still_closes_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server, client, sink):
            sink.gate.clear()
            client.request()
            await asyncio.sleep(0.05)
            try:
                await asyncio.wait_for(server.drain(), 0.1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("drain returned with a request still in the sink")
            assert server._socket is None

    run(main())


def test_get_attributes_with_observe_is_answered_unobserved_until_the_downlink_exists(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (api, server, client, _):
            api.attributes.update("id-thermostat-1", "shared", {"interval": 5})
            client.request(Code.GET, ((Option.OBSERVE, b""), *ATTRIBUTES), b"")
            reply = await client.recv()
            assert reply.code == Code.CONTENT and reply.option(Option.OBSERVE) is None
            assert orjson.loads(reply.payload) == {"shared": {"interval": 5}}
            assert list(server.endpoint.observations()) == []

    run(main())


def test_credential_backend_down_is_5_03_and_a_crashing_lookup_is_5_00(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, retry_after_seconds=3) as (api, _, client, sink):
            source = api.auth._sources[0]

            async def unavailable(credentials: Any) -> Any:
                await asyncio.sleep(0.01)
                raise CredentialsUnavailable("backend down")

            async def broken(credentials: Any) -> Any:
                raise RuntimeError("bug")

            source.lookup = unavailable
            client.request(options=path("api", "v1", "fresh-1", "telemetry"))
            reply = await client.recv()
            assert (reply.code, decode_uint(reply.option(Option.MAX_AGE) or b"")) == (Code.SERVICE_UNAVAILABLE, 3)
            source.lookup = broken
            client.request(options=path("api", "v1", "fresh-2", "telemetry"))
            assert (await client.recv()).code == Code.INTERNAL_SERVER_ERROR
            assert api.metrics.errors.labels(component="coap")._value.get() == 1
            assert sink.records == []

    run(main())


def test_a_failing_handler_is_answered_5_00(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (api, server, client, _):

            def broken(*args: Any) -> Any:
                raise RuntimeError("attribute store failed")

            api.attribute_request = broken
            client.request(Code.GET, ATTRIBUTES, b"")
            assert (await client.recv()).code == Code.INTERNAL_SERVER_ERROR
            assert server.pending == 0

    run(main())


def test_too_many_unanswered_requests_are_refused_with_5_03(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_pending=2) as (api, server, client, sink):
            sink.gate.clear()
            first, second = client.request(), client.request()
            await asyncio.sleep(0.05)
            third = client.request()
            reply = await client.recv()
            assert (reply.mid, reply.code) == (third.mid, Code.SERVICE_UNAVAILABLE)
            assert reply.option(Option.MAX_AGE) is not None
            assert api.metrics.refusals.labels(transport="coap", reason="overloaded")._value.get() == 1
            sink.gate.set()
            assert {(await client.recv()).mid for _ in range(2)} == {first.mid, second.mid}
            assert server.pending == 0

    run(main())


# ---------------------------------------------------------------- downlink (in process)

RPC = path("api", "v1", TOKEN, "rpc")


def subscriptions(api: Any, feature: str) -> float:
    return api.metrics.registry.get_sample_value("tb_gateway_downlink_subscriptions", {"feature": feature})


def test_deregistration_refused_for_a_bad_option_keeps_the_session_and_its_notifications(tmp_path: Path) -> None:
    """RFC 7252 §5.4.1: a 4.02 request has no effect; the hub and the endpoint keep agreeing."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as (api, server, client, _):
            register = Message(CON, Code.GET, 1, b"oA", ((Option.OBSERVE, b""), *RPC))
            client.send(register)
            assert (await client.recv()).code == Code.VALID
            assert subscriptions(api, "rpc") == 1
            client.send(Message(CON, Code.GET, 2, b"oA", ((Option.OBSERVE, b"\x01"), *RPC, (9, b""))))
            assert (await client.recv()).code == Code.BAD_OPTION
            assert subscriptions(api, "rpc") == 1 and len(list(server.endpoint.observations())) == 1
            assert api.downlink is not None
            api.downlink.send_rpc("id-thermostat-1", "ping", {})
            notification = await client.recv()
            assert notification.token == b"oA" and orjson.loads(notification.payload)["method"] == "ping"
            client.send(Message(ACK, Code.EMPTY, notification.mid))
            client.send(Message(CON, Code.GET, 3, b"oA", ((Option.OBSERVE, b"\x00\x01"), *RPC)))  # uint 1
            assert (await client.recv()).code == Code.DELETED
            assert subscriptions(api, "rpc") == 0 and list(server.endpoint.observations()) == []

    run(main())


def test_a_registration_beyond_the_observer_cap_is_answered_without_observe(tmp_path: Path) -> None:
    """RFC 7641 §4.1 (docs/coap.md Limits): not registered, and the client can tell."""

    async def main() -> None:
        config = EndpointConfig(max_observations=1)
        async with serving(tmp_path, config=config, downlink=True) as (api, server, client, _):
            api.attributes.update("id-thermostat-1", "shared", {"interval": 5})
            client.send(Message(CON, Code.GET, 1, b"r", ((Option.OBSERVE, b""), *RPC)))
            assert (await client.recv()).option(Option.OBSERVE) is not None
            client.send(Message(CON, Code.GET, 2, b"a", ((Option.OBSERVE, b""), *ATTRIBUTES)))
            reply = await client.recv()
            assert (reply.code, reply.option(Option.OBSERVE)) == (Code.CONTENT, None)
            assert orjson.loads(reply.payload) == {"interval": 5}  # what the registration would have answered
            assert subscriptions(api, "attributes") == 0 and len(list(server.endpoint.observations())) == 1
            assert refusals(api) == {"max_observers": 1}

    run(main())


def test_an_idle_observer_is_pinged_kept_when_it_answers_and_dropped_when_it_has_vanished(tmp_path: Path) -> None:
    """docs/coap.md Limits: an observer not heard from for ``observer_check_s`` gets an empty CON; a RST keeps
    its observation (and its downlink session), silence through the retransmissions ends both."""

    async def main() -> None:
        config = EndpointConfig(observer_check_s=0.3, ack_timeout_s=0.1, max_retransmit=1)
        async with serving(tmp_path, config=config, downlink=True) as (api, server, client, _):
            client.send(Message(CON, Code.GET, 1, b"oA", ((Option.OBSERVE, b""), *RPC)))
            assert (await client.recv()).code == Code.VALID
            ping = await client.recv(within=2.0)
            assert (ping.type, ping.code, ping.token, ping.payload) == (CON, Code.EMPTY, b"", b"")
            client.send(Message(RST, Code.EMPTY, ping.mid))  # what any CoAP endpoint answers to a ping
            await asyncio.sleep(0.2)
            assert subscriptions(api, "rpc") == 1 and len(list(server.endpoint.observations())) == 1
            assert api.downlink is not None
            api.downlink.send_rpc("id-thermostat-1", "still-there", {})
            notification = await client.recv()
            assert orjson.loads(notification.payload)["method"] == "still-there"
            client.send(Message(ACK, Code.EMPTY, notification.mid))
            again = await client.recv(within=2.0)  # the next check: now the device says nothing
            assert again.code == Code.EMPTY and again.mid != ping.mid
            assert (await client.recv(within=1.0)).mid == again.mid  # retransmitted once (MAX_RETRANSMIT 1)
            await asyncio.sleep(1.0)  # the retransmission's timeout is 0.2-0.3 s: given up by now
            assert subscriptions(api, "rpc") == 0 and list(server.endpoint.observations()) == []

    run(main())


def observe(feature: tuple[tuple[int, bytes], ...], mid: int, token: bytes) -> Message:
    return Message(CON, Code.GET, mid, token, ((Option.OBSERVE, b""), *feature))


def test_an_rpc_held_back_by_a_full_notification_window_goes_out_when_an_ack_frees_it(tmp_path: Path) -> None:
    """docs/coap.md Limits: beyond the unacknowledged CON notifications per observer the downlink waits for
    ACKs, and then goes on (it used to wait for a new registration, so the RPC expired)."""

    async def main() -> None:
        config = EndpointConfig(max_notifications_in_flight=2)
        async with serving(tmp_path, config=config, downlink=True) as (api, _, client, _):
            hub = api.downlink
            assert hub is not None
            client.send(observe(RPC, 1, b"r"))
            assert (await client.recv()).code == Code.VALID
            waiters = [hub.send_rpc("id-thermostat-1", f"m{i}", None, oneway=True)[1] for i in range(3)]
            first, second = await client.recv(), await client.recv()
            await client.silent()  # two unacknowledged: the third waits
            client.send(Message(ACK, Code.EMPTY, first.mid))
            third = await client.recv()
            assert [orjson.loads(n.payload)["method"] for n in (first, second, third)] == ["m0", "m1", "m2"]
            client.send(Message(ACK, Code.EMPTY, second.mid))
            client.send(Message(ACK, Code.EMPTY, third.mid))
            outcomes = await asyncio.wait_for(asyncio.gather(*waiters), 3)
            assert [outcome.status for outcome in outcomes] == [RpcStatus.DELIVERED] * 3
            assert subscriptions(api, "rpc") == 1

    run(main())


def test_attribute_changes_held_back_by_a_full_window_are_merged_and_sent_when_an_ack_frees_it(
    tmp_path: Path,
) -> None:
    """Updates are deltas: one the window could not take must not be lost (it was dropped silently)."""

    async def main() -> None:
        config = EndpointConfig(max_notifications_in_flight=2)
        async with serving(tmp_path, config=config, downlink=True) as (api, _, client, _):
            hub = api.downlink
            assert hub is not None
            device = "id-thermostat-1"
            client.send(observe(ATTRIBUTES, 1, b"a"))
            assert (await client.recv()).code == Code.CONTENT
            hub.change_shared(device, SharedChange({"a": 1}))
            hub.change_shared(device, SharedChange({"b": 2}))
            first, _ = await client.recv(), await client.recv()
            hub.change_shared(device, SharedChange({"c": 3}))  # the window is full from here on
            hub.change_shared(device, SharedChange({"d": 4}, ("b",)))
            hub.change_shared(device, SharedChange({}, ("c",)))
            await client.silent()
            client.send(Message(ACK, Code.EMPTY, first.mid))
            held = await client.recv()
            assert orjson.loads(held.payload) == {"d": 4, "deleted": ["b", "c"]}  # the three changes, as one
            await client.silent()

    run(main())


def test_merged_attribute_updates_keep_the_last_change_of_each_key() -> None:
    older = {"a": 1, "x": 0, "deleted": ["b"]}
    newer = {"b": 2, "deleted": ["a"]}
    assert merge_updates(older, newer) == {"x": 0, "b": 2, "deleted": ["a"]}
    assert older == {"a": 1, "x": 0, "deleted": ["b"]} and newer == {"b": 2, "deleted": ["a"]}  # untouched


def test_a_registration_with_the_same_token_for_another_device_replaces_the_old_one(tmp_path: Path) -> None:
    """RFC 7641 §4.1: one socket, one (empty) token, two devices: the second registration takes over; the
    first device's session ends (it used to keep the token, and the second device's RPC expired)."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as (api, server, client, _):
            hub = api.downlink
            assert hub is not None
            client.send(observe(RPC, 1, b""))
            assert (await client.recv()).code == Code.VALID
            client.send(observe(path("api", "v1", "T2", "rpc"), 2, b""))
            assert (await client.recv()).code == Code.VALID
            assert subscriptions(api, "rpc") == 1 and len(list(server.endpoint.observations())) == 1
            assert not hub.sessions.holds("id-thermostat-1")
            _, delivered = hub.send_rpc("id-meter-2", "forMeter", None, oneway=True)
            notification = await client.recv()
            assert orjson.loads(notification.payload)["method"] == "forMeter"
            client.send(Message(ACK, Code.EMPTY, notification.mid))
            assert (await asyncio.wait_for(delivered, 3)).status is RpcStatus.DELIVERED
            hub.send_rpc("id-thermostat-1", "forThermostat", None)
            await client.silent()  # nobody observes for the thermostat any more: its RPC waits

    run(main())


def test_a_registration_with_the_same_token_for_another_feature_replaces_the_old_one(tmp_path: Path) -> None:
    """docs/coap.md: the RPC subscription used to stay on the token, and an RPC went out as a notification
    of the attributes observation."""

    async def main() -> None:
        async with serving(tmp_path, downlink=True) as (api, server, client, _):
            hub = api.downlink
            assert hub is not None
            client.send(observe(RPC, 1, b"\x07"))
            assert (await client.recv()).code == Code.VALID
            client.send(observe(ATTRIBUTES, 2, b"\x07"))
            assert (await client.recv()).code == Code.CONTENT
            assert (subscriptions(api, "rpc"), subscriptions(api, "attributes")) == (0, 1)
            hub.send_rpc("id-thermostat-1", "ping", None)
            await client.silent()
            hub.change_shared("id-thermostat-1", SharedChange({"interval": 5}))
            notification = await client.recv()
            assert notification.token == b"\x07" and orjson.loads(notification.payload) == {"interval": 5}
            [observation] = server.endpoint.observations()
            assert observation.path[-1] == "attributes"

    run(main())
