"""What the loop's thread spends per HTTP request in the C lanes and the C-API they call (no syscalls, no uvloop).

    python -m bench.lane_cost [--connections 200] [--rounds 200] [--repeats 5]

One process: a real ``Gateway`` (embedded store, HTTP only) whose store runs each write at once on the loop
with the append itself cut out (as ``bench/store_variant.py``'s no-append; never for real use), and
``HttpConnection`` objects on fake transports (their ``write`` and ``is_closing`` are C callables, as
uvloop's are). Each round feeds every connection one wrk-like telemetry POST, lets the batch leave, then
polls the store so the answers are written: the fast lane, ``Ingest``, the pipeline, the store's encoding,
settling and the 200s. The best of ``repeats`` timings is reported in µs per request: a figure for
comparing builds of the C lanes, far less noisy than a throughput run (README, "Where the lanes' time went").
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

import uvloop

from tb_gateway.app import Gateway
from tb_gateway.config import Settings
from tb_gateway.http.connection import HttpConnection
from tb_gateway.registry import Registry
from tb_gateway.sinks.segments import SegmentWriter
from tb_gateway.sinks.store import StoreSink

TOKEN = "BENCH_HTTP_TOKEN_0001"
BODY = b'{"temperature":42.5,"humidity":73,"active":true,"note":"ok"}'  # bench/http_bench.py's
REQUEST = (
    b"POST /api/v1/%s/telemetry HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (TOKEN.encode(), len(BODY), BODY)
)


class FakeTransport:
    """A transport that keeps the last answer; its hot methods are C callables, as uvloop's are."""

    def __init__(self) -> None:
        self.last: deque[bytes] = deque(maxlen=1)
        self.write = self.last.append
        self.is_closing = (0).__bool__  # False, without a Python frame

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _store_without_write() -> None:
    """The store's work runs at once on the loop and appends nothing; answers wait for the next poll."""
    StoreSink._submit = lambda self, work, done: self._finished.append((done, work(), None))  # type: ignore[method-assign]
    SegmentWriter.append = lambda self, payloads: self._cursor.seq  # type: ignore[method-assign]


async def measure(connections: int, rounds: int, repeats: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="tb-lane-cost-"))
    Registry(data_dir / "registry.db").add("bench-http", token=TOKEN)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=data_dir,
        kafka_enabled=False,
        mqtt_enabled=False,
        coap_enabled=False,
        http_port=_free_port(),
        metrics_port=_free_port(),
        admin_port=_free_port(),
        batch_size=2000,
        store_commit_interval=0.0,  # every round's batch leaves at its kick, however few connections
    )
    _store_without_write()
    gateway = Gateway(settings)
    running = asyncio.create_task(gateway.run())
    server = gateway.servers[0]
    while getattr(server, "_server", None) is None:  # started (the store's open waits for a poll)
        if running.done():
            running.result()
        cast(Any, gateway.sink).poll()  # the store's poll: not part of the Sink protocol
        await asyncio.sleep(0.01)
    peers = []
    for _ in range(connections):
        peer, transport = HttpConnection(server), FakeTransport()  # type: ignore[arg-type]
        peer.connection_made(transport)  # type: ignore[arg-type]
        peers.append((peer, transport))
    poll = gateway.pipeline.poll
    first, answers = peers[0]
    first.data_received(REQUEST)  # the auth cache learns the token (a lookup in a task, the general path)
    while not answers.last:
        poll()
        await asyncio.sleep(0.01)

    async def one_round() -> None:
        for peer, _ in peers:
            peer.data_received(REQUEST)
        await asyncio.sleep(0)  # the pipeline's kick: the batch leaves, the store "writes" it
        poll()  # the answers

    for _ in range(20):  # warm up: the auth cache, the route caches, the allocator
        await one_round()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(rounds):
            await one_round()
        timings.append((time.perf_counter() - started) / (rounds * connections) * 1e6)
    answered = sum(len(transport.last) for _, transport in peers)
    lane = cast(Any, server).lane  # the HTTP server's C lane
    taken = lane.taken if lane is not None else 0
    for peer, _ in peers:
        peer.connection_lost(None)
    gateway.request_stop()
    await asyncio.wait_for(_stopped(running, poll), 30)
    return {"us_per_request": min(timings), "timings_us": timings, "answered": answered, "taken": taken}


async def _stopped(running: asyncio.Task[None], poll: Any) -> None:
    while not running.done():
        poll()
        await asyncio.sleep(0.01)
    running.result()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lane_cost")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = uvloop.run(measure(args.connections, args.rounds, args.repeats))
    if result["answered"] != args.connections:
        raise SystemExit(f"only {result['answered']} of {args.connections} connections were answered")
    if result["taken"] < args.connections * args.rounds * args.repeats:
        raise SystemExit(f"the fast lane took only {result['taken']} requests: this measures the general path")
    print(f"HTTP fast lane, {args.connections} connections: {result['us_per_request']:.2f} µs per request (best)")


if __name__ == "__main__":
    main()
