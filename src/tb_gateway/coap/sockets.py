"""The CoAP server's UDP socket, two ways, behind the same two calls (``send`` and ``close``).

- Batched (when the C fast path is built): the socket is read with one ``recvmmsg`` per readiness event,
  up to 32 datagrams, and a flush's answers leave with one ``sendmmsg``. At tens of thousands of requests a
  second that replaces two system calls and two event-loop callbacks per request with two per batch.
- Otherwise an asyncio datagram transport: a callback per datagram and a ``sendto`` per answer.

Either way the server is handed lists of ``(data, address)`` with the addresses the socket module builds:
``(host, port)``, or ``(host, port, flowinfo, scope_id)`` for IPv6.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

try:  # the C fast path (setup.py builds it when a compiler is present)
    from tb_gateway import _speedups
except ImportError:  # pragma: no cover - a build without a C compiler uses the asyncio transport
    _speedups = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Address = Any  # a socket-module address tuple
Datagrams = list[tuple[bytes, Address]]
Receiver = Callable[[Datagrams], None]

RECEIVE_BUFFER_BYTES = 4 << 20  # absorbs bursts of small datagrams while the loop is busy with a batch
MAX_UNSENT = 65_536  # answers waiting for room in a full send buffer; beyond that they are dropped, as UDP would


class DatagramSocket(Protocol):
    port: int

    def send(self, datagrams: Datagrams) -> None: ...

    def close(self) -> None: ...


async def open_socket(host: str, port: int, receive: Receiver, *, reuse_port: bool = False) -> DatagramSocket:
    """Bind ``host:port`` (port 0: any free one) and hand every datagram read to ``receive``."""
    loop = asyncio.get_running_loop()
    if _speedups is None:
        transport, adapter = await loop.create_datagram_endpoint(
            lambda: TransportSocket(receive), local_addr=(host, port), reuse_port=reuse_port
        )
        _grow_receive_buffer(transport.get_extra_info("socket"))
        return adapter
    error: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM):
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        _grow_receive_buffer(sock)
        return BatchedSocket(sock, loop, receive)
    raise error or OSError(f"no address to bind for {host}:{port}")


def _grow_receive_buffer(sock: Any) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):  # capped by the kernel; the default still works
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)


class BatchedSocket:
    """A non-blocking socket watched by the loop; reads and writes go through ``_speedups`` in batches."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, receive: Receiver) -> None:
        assert _speedups is not None
        self._recv, self._send = _speedups.recv_datagrams, _speedups.send_datagrams
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._receive = receive
        self._unsent: Datagrams = []  # in order, behind a full send buffer
        self.port: int = sock.getsockname()[1]
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        """One batch per readiness event; the loop calls again while more is waiting (level-triggered)."""
        try:
            batch = self._recv(self._fd)
        except OSError as exc:  # per peer (ICMP) or transient: log and keep reading, never stop serving
            log.debug("CoAP socket error: %s", exc)
            return
        if batch:
            self._receive(batch)

    def send(self, datagrams: Datagrams) -> None:
        if self._fd < 0 or not datagrams:
            return
        if self._unsent:  # earlier answers wait for room: keep the order
            self._unsent.extend(datagrams[: MAX_UNSENT - len(self._unsent)])
            return
        try:
            done = self._send(self._fd, datagrams, 0)
        except OSError as exc:
            log.debug("CoAP send failed: %s", exc)
            return
        if done < len(datagrams):
            self._unsent = datagrams[done : done + MAX_UNSENT]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            done = self._send(self._fd, self._unsent, 0)
        except OSError as exc:
            log.debug("CoAP send failed: %s", exc)
            done = len(self._unsent)
        del self._unsent[:done]
        if not self._unsent:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        if self._unsent:
            self._loop.remove_writer(self._fd)
            self._unsent = []
        self._fd = -1
        self._sock.close()


class TransportSocket(asyncio.DatagramProtocol):
    """The asyncio transport, for builds without the C fast path."""

    def __init__(self, receive: Receiver) -> None:
        self._receive = receive
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self._receive([(data, addr)])

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (a client's port closed) are per peer: log and keep reading — never stop serving."""
        log.debug("CoAP socket error: %s", exc)

    def send(self, datagrams: Datagrams) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            for data, addr in datagrams:
                transport.sendto(data, addr)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
