"""Request target -> endpoint, by table (sans-IO: bytes in, a frozen answer out).

Two tables: plain paths (``/health``) and device paths ``/api/v1/{token}/<suffix>``, where the suffix is
looked up exactly and then against patterns whose ``{id}`` segment matches any one segment. The downlink
issue adds its endpoints as rows (``rpc``, ``rpc/{id}``, ``attributes/updates``); nothing else changes.

Answers: ``Match`` (endpoint, token, query, path parameter) or ``Miss`` (404, or 405 with the ``Allow``
value). A wrong method on a known path is 405 even with an unknown token: the path alone decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import unquote


class Endpoint(enum.Enum):
    HEALTH = "health"
    TELEMETRY = "telemetry"  # POST: device message
    ATTRIBUTES = "attributes"  # POST: client attributes, a device message
    ATTRIBUTE_REQUEST = "attribute_request"  # GET: read client / shared attributes
    CLAIM = "claim"  # POST: device message
    RPC_POLL = "rpc_poll"  # GET rpc: long poll for a server-side RPC (http/downlink.py)
    RPC_REPLY = "rpc_reply"  # POST rpc/{id}: the device's reply
    CLIENT_RPC = "client_rpc"  # POST rpc: the device asks the backend
    ATTRIBUTE_UPDATES = "attribute_updates"  # GET attributes/updates: long poll for shared attributes

    @property
    def takes_body(self) -> bool:
        return self in _WITH_BODY


_WITH_BODY = frozenset(
    {Endpoint.TELEMETRY, Endpoint.ATTRIBUTES, Endpoint.CLAIM, Endpoint.RPC_REPLY, Endpoint.CLIENT_RPC}
)

Methods = dict[bytes, Endpoint]

PLAIN: dict[bytes, Methods] = {
    b"/health": {b"GET": Endpoint.HEALTH},
}

DEVICE_PREFIX = b"/api/v1/"

DEVICE: dict[bytes, Methods] = {
    b"telemetry": {b"POST": Endpoint.TELEMETRY},
    b"attributes": {b"POST": Endpoint.ATTRIBUTES, b"GET": Endpoint.ATTRIBUTE_REQUEST},
    b"claim": {b"POST": Endpoint.CLAIM},
    b"rpc": {b"GET": Endpoint.RPC_POLL, b"POST": Endpoint.CLIENT_RPC},
    b"attributes/updates": {b"GET": Endpoint.ATTRIBUTE_UPDATES},
}

# Suffixes with one variable segment, written with "{id}".
DEVICE_PATTERNS: dict[bytes, Methods] = {b"rpc/{id}": {b"POST": Endpoint.RPC_REPLY}}


@dataclass(frozen=True, slots=True)
class Match:
    endpoint: Endpoint
    token: str | None  # None for plain paths
    query: bytes = b""
    param: str | None = None  # the "{id}" segment of a pattern route


@dataclass(frozen=True, slots=True)
class Miss:
    status: int  # 404 or 405
    allow: bytes = b""  # for 405: "GET, POST"


NOT_FOUND = Miss(404)


def _allow(methods: Methods) -> Miss:
    return Miss(405, b", ".join(sorted(methods)))


def resolve(method: bytes, target: bytes) -> Match | Miss:
    """Route one request target (origin form, or absolute form ``http://host/path``)."""
    path, _, query = target.partition(b"?")
    if not path.startswith(b"/"):
        path = _origin(path)
    methods = PLAIN.get(path)
    if methods is not None:
        endpoint = methods.get(method)
        return Match(endpoint, None, query) if endpoint is not None else _allow(methods)
    if not path.startswith(DEVICE_PREFIX):
        return NOT_FOUND
    token, slash, suffix = path[len(DEVICE_PREFIX) :].partition(b"/")
    if not token or not slash:
        return NOT_FOUND
    param: str | None = None
    methods = DEVICE.get(suffix)
    if methods is None:
        methods, param = _pattern(suffix)
        if methods is None:
            return NOT_FOUND
    endpoint = methods.get(method)
    if endpoint is None:
        return _allow(methods)
    return Match(endpoint, _text(token), query, param)


def _pattern(suffix: bytes) -> tuple[Methods | None, str | None]:
    head, slash, last = suffix.rpartition(b"/")
    if slash and last and b"/" not in last:
        methods = DEVICE_PATTERNS.get(head + b"/{id}")
        if methods is not None:
            return methods, _text(last)
    return None, None


def _origin(target: bytes) -> bytes:
    """``http://host:port/p`` -> ``/p``; anything else (``*``, authority form) matches no route."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha():
        return b""
    _, slash, path = rest.partition(b"/")
    return b"/" + path if slash else b"/"


def _text(segment: bytes) -> str:
    text = segment.decode("utf-8", "replace")
    return unquote(text) if "%" in text else text


def query_values(query: bytes) -> dict[str, str]:
    """``a=1&b=x%2Cy`` -> ``{"a": "1", "b": "x,y"}``; the first of repeated names wins, as in Spring."""
    values: dict[str, str] = {}
    if not query:
        return values
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        key = unquote(name.decode("utf-8", "replace").replace("+", " "))
        if key and key not in values:
            values[key] = unquote(value.decode("utf-8", "replace").replace("+", " "))
    return values
