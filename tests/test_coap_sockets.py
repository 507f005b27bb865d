"""The CoAP server's batched UDP socket (coap/sockets.py over _speedups' recvmmsg / sendmmsg), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tb_gateway import _speedups
from tb_gateway.coap import sockets
from tb_gateway.coap.sockets import MAX_UNSENT, BatchedSocket, open_socket


@contextlib.contextmanager
def udp_pair(family: int = socket.AF_INET, host: str = "127.0.0.1") -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
    try:
        server.bind((host, 0))
        server.setblocking(False)
        client.bind((host, 0))
        client.settimeout(2)
        yield server, client
    finally:
        server.close()
        client.close()


def receive_all(server: socket.socket, expected: int) -> list[tuple[bytes, Any]]:
    got: list[tuple[bytes, Any]] = []
    for _ in range(200):
        got += _speedups.recv_datagrams(server.fileno())
        if len(got) >= expected:
            break
        time.sleep(0.005)
    return got


def test_the_c_fast_path_is_built() -> None:
    """`make test` builds it (setup.py); the server would otherwise use the asyncio transport."""
    assert sockets._speedups is not None


def test_one_call_reads_at_most_a_batch_whole_and_with_the_socket_modules_address() -> None:
    with udp_pair() as (server, client):
        sizes = [0, 1, 60_000, *range(2, 39)]  # 40 datagrams: an empty one and one far above any MTU
        sent = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
        for data in sent:
            client.sendto(data, server.getsockname())
        first = receive_all(server, 32)
        assert len(first) == 32  # one recvmmsg takes a batch, the rest waits for the next readiness event
        rest = receive_all(server, 8)
        assert [data for data, _ in first + rest] == sent  # nothing truncated, in order
        assert {address for _, address in first + rest} == {client.getsockname()}
        assert first[0][1] is rest[-1][1]  # one tuple per peer, reused
        assert _speedups.recv_datagrams(server.fileno()) == []  # nothing left: no error, no wait


def test_ipv6_addresses_are_four_tuples_and_answers_reach_them() -> None:
    try:
        pair = udp_pair(socket.AF_INET6, "::1")
        server, client = pair.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        client.sendto(b"ping", server.getsockname())
        ((data, address),) = receive_all(server, 1)
        assert (data, address) == (b"ping", client.getsockname())
        assert len(address) == 4
        assert _speedups.send_datagrams(server.fileno(), [(b"pong", address), (b"again", ("::1", address[1]))], 0) == 2
        assert client.recvfrom(100) == (b"pong", server.getsockname())
        assert client.recv(100) == b"again"  # a tuple the cache never saw is parsed
    finally:
        pair.__exit__(None, None, None)


def test_send_drops_what_the_kernel_or_the_address_refuses_and_sends_the_rest() -> None:
    with udp_pair() as (server, client):
        peer = client.getsockname()
        datagrams = [
            (b"first", peer),
            (b"to port 0", ("127.0.0.1", 0)),  # EINVAL from the kernel
            (b"not an address", ("no such host", 5683)),
            (b"not a tuple", None),
            (b"last", peer),
        ]
        assert _speedups.send_datagrams(server.fileno(), datagrams, 0) == len(datagrams)
        assert client.recv(100) == b"first"
        assert client.recv(100) == b"last"
        assert _speedups.send_datagrams(server.fileno(), datagrams, 4) == len(datagrams)  # from `start`
        assert client.recv(100) == b"last"
        with pytest.raises(TypeError):
            _speedups.send_datagrams(server.fileno(), [b"no address"], 0)  # type: ignore[list-item]


def test_a_closed_socket_is_an_os_error_not_a_crash() -> None:
    with udp_pair() as (server, _):
        fd = server.fileno()
    with pytest.raises(OSError):
        _speedups.recv_datagrams(fd)
    with pytest.raises(OSError):
        _speedups.send_datagrams(fd, [(b"x", ("127.0.0.1", 9))], 0)


def test_answers_behind_a_full_send_buffer_wait_in_order_and_are_capped() -> None:
    async def main() -> None:
        got: list[Any] = []
        batched = await open_socket("127.0.0.1", 0, got.extend)
        assert isinstance(batched, BatchedSocket)
        sent: list[bytes] = []
        room = [2]  # datagrams the fake socket buffer takes before it is full

        def send(fd: int, datagrams: list[tuple[bytes, Any]], start: int) -> int:
            take = min(room[0], len(datagrams) - start)
            room[0] -= take
            sent.extend(data for data, _ in datagrams[start : start + take])
            return start + take

        batched._send = send  # type: ignore[method-assign]
        address = ("127.0.0.1", 9)
        batched.send([(b"%d" % n, address) for n in range(5)])
        batched.send([(b"5", address)])  # queued behind the first five, never ahead of them
        assert sent == [b"0", b"1"]
        room[0] = 3
        batched._writable()
        assert sent == [b"0", b"1", b"2", b"3", b"4"]
        room[0] = 10
        batched._writable()
        assert sent[-1] == b"5" and not batched._unsent
        room[0] = 0
        batched.send([(b"x", address)] * (MAX_UNSENT + 10))
        batched.send([(b"y", address)])
        assert len(batched._unsent) == MAX_UNSENT  # beyond the cap answers are dropped, as UDP would
        batched.close()
        batched.close()  # twice is harmless
        batched.send([(b"z", address)])  # after close: nothing, no error

    asyncio.run(main())


def test_the_server_socket_reads_batches_into_the_receiver() -> None:
    async def main() -> None:
        batches: list[list[tuple[bytes, Any]]] = []
        arrived = asyncio.Event()

        def receive(batch: list[tuple[bytes, Any]]) -> None:
            batches.append(batch)
            if sum(map(len, batches)) == 50:
                arrived.set()

        batched = await open_socket("127.0.0.1", 0, receive)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for n in range(50):
                client.sendto(b"%d" % n, ("127.0.0.1", batched.port))
            await asyncio.wait_for(arrived.wait(), 5)
            assert [data for batch in batches for data, _ in batch] == [b"%d" % n for n in range(50)]
            batched.send([(b"answer", batches[0][0][1])])
            client.settimeout(2)
            assert client.recv(100) == b"answer"
        batched.close()

    asyncio.run(main())


def test_binding_a_taken_port_fails_loudly() -> None:
    async def main() -> None:
        first = await open_socket("127.0.0.1", 0, lambda batch: None)
        try:
            with pytest.raises(OSError):
                await open_socket("127.0.0.1", first.port, lambda batch: None)
        finally:
            first.close()

    asyncio.run(main())
