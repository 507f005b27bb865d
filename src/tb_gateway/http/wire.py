"""HTTP/1.1 response bytes, built once (sans-IO: no clock; the server passes the Date in).

Every response is one ``bytes`` object for one ``transport.write``. Bodiless answers (200, 401, 404, ...) come
from a table rebuilt once a second when the Date changes, in three variants: keep-alive HTTP/1.1 (no
Connection header), keep-alive HTTP/1.0 (``Connection: keep-alive``) and close (``Connection: close``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import orjson

REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
JSON = b"application/json"


class Persist(enum.IntEnum):
    """How the connection goes on after a response."""

    KEEP = 0  # HTTP/1.1 keep-alive: the default, no header needed
    KEEP_10 = 1  # HTTP/1.0 client that asked for keep-alive
    CLOSE = 2


_CONNECTION = {
    Persist.KEEP: b"",
    Persist.KEEP_10: b"Connection: keep-alive\r\n",
    Persist.CLOSE: b"Connection: close\r\n",
}


def http_date(epoch_s: float) -> bytes:
    return formatdate(epoch_s, usegmt=True).encode("ascii")


def response(
    status: int,
    date: bytes,
    persist: Persist,
    body: bytes = b"",
    content_type: bytes = b"",
    extra: bytes = b"",
) -> bytes:
    """One complete response; ``extra`` is already-formatted header lines (``Name: value\\r\\n``)."""
    head = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n" % (status, REASONS[status], date, len(body))]
    if content_type:
        head.append(b"Content-Type: %s\r\n" % content_type)
    head.append(extra)
    head.append(_CONNECTION[persist])
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


class EmptyResponses:
    """Bodiless responses for the current second: ``table[persist][status]``."""

    STATUSES = (200, 401, 404, 408, 413, 431)  # a bodiless Reply must be one of these
    __slots__ = ("date", "second", "table")  # the fast lane reads table at every answer (_lanes.c)

    def __init__(self, epoch_s: float) -> None:
        self.second = -1
        self.date = b""
        self.table: tuple[dict[int, bytes], ...] = ()
        self.refresh(epoch_s)

    def refresh(self, epoch_s: float) -> None:
        second = int(epoch_s)
        if second == self.second:
            return
        self.second = second
        self.date = http_date(second)
        self.table = tuple(
            {status: response(status, self.date, persist) for status in self.STATUSES} for persist in Persist
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A response with a body or extra headers; bodiless answers are just their status (``Reply = int``)."""

    status: int
    body: bytes = b""
    content_type: bytes = b""
    extra: bytes = b""  # formatted header lines


Reply = int | Answer


def json_answer(status: int, document: Any, extra: bytes = b"") -> Answer:
    return Answer(status, orjson.dumps(document), JSON, extra)


def error(status: int, message: str, extra: bytes = b"") -> Answer:
    """The JSON error body every refusal with a reason carries: ``{"error": "..."}``."""
    return Answer(status, orjson.dumps({"error": message}), JSON, extra)


def render(reply: Reply, table: EmptyResponses, persist: Persist) -> bytes:
    if type(reply) is int:
        return table.table[persist][reply]
    assert isinstance(reply, Answer)
    return response(reply.status, table.date, persist, reply.body, reply.content_type, reply.extra)
