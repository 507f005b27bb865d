"""The floor of the gateway's architecture: the least a Python server on uvloop can do per message.

Each server answers at once and keeps nothing: no authentication, no normalization, no pipeline, no store.
What the gateway costs above these is its own work; what these cost is the price of Python + uvloop itself,
which no change inside the gateway can go below (bench/floor.py compares them with the C references).

    python -m bench.floor_servers mqtt|http|coap PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httptools
import uvloop

CONNACK = b"\x20\x02\x00\x00"
PINGRESP = b"\xd0\x00"
HTTP_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class MqttFloor(asyncio.Protocol):
    """MQTT 3.1.1 framing only: CONNACK a CONNECT, PUBACK a QoS 1 PUBLISH, PINGRESP a PINGREQ, in one write."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.rest = b""

    def data_received(self, data: bytes) -> None:
        buf = self.rest + data if self.rest else data
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while pos + 2 <= n:
            length = shift = 0
            i = pos + 1
            while i < n:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            else:
                break  # the remaining length is not complete yet
            end = i + length
            if end > n:
                break
            kind = buf[pos] >> 4
            if kind == 3 and (buf[pos] >> 1) & 0x03 == 1:  # QoS 1: the packet id follows the topic
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                out.append(b"\x40\x02" + buf[topic_end : topic_end + 2])
            elif kind == 1:
                out.append(CONNACK)
            elif kind == 12:
                out.append(PINGRESP)
            pos = end
        self.rest = buf[pos:]
        if out:
            self.transport.write(b"".join(out))


class HttpFloor(asyncio.Protocol):
    """httptools, as the gateway uses it: a 200 with no body once a request is complete."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(HTTP_200)


class CoapFloor(asyncio.DatagramProtocol):
    """A piggybacked ACK 2.01 with the request's message id and token for every CON; nothing for the rest."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 0x03 == 0:  # version 1, CON
            token_length = data[0] & 0x0F
            self.transport.sendto(bytes((0x60 | token_length, 0x41)) + data[2 : 4 + token_length], addr)


async def serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "coap":
        await loop.create_datagram_endpoint(CoapFloor, local_addr=("127.0.0.1", port))
    else:
        await loop.create_server(MqttFloor if kind == "mqtt" else HttpFloor, "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], int(sys.argv[2])))
