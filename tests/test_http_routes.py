"""The sans-IO parts of the HTTP transport: routing table, query parsing, response bytes."""

from __future__ import annotations

import httptools
import pytest

from tb_gateway.http import routes
from tb_gateway.http.routes import Endpoint, Match, Miss, query_values, resolve
from tb_gateway.http.wire import EmptyResponses, Persist, http_date, response


@pytest.mark.parametrize(
    ("method", "target", "endpoint", "token"),
    [
        (b"POST", b"/api/v1/ABC/telemetry", Endpoint.TELEMETRY, "ABC"),
        (b"POST", b"/api/v1/ABC/attributes", Endpoint.ATTRIBUTES, "ABC"),
        (b"GET", b"/api/v1/ABC/attributes?clientKeys=a", Endpoint.ATTRIBUTE_REQUEST, "ABC"),
        (b"POST", b"/api/v1/ABC/claim", Endpoint.CLAIM, "ABC"),
        (b"GET", b"/health", Endpoint.HEALTH, None),
        (b"GET", b"/health?verbose=1", Endpoint.HEALTH, None),
        (b"POST", b"http://gw:8081/api/v1/ABC/telemetry", Endpoint.TELEMETRY, "ABC"),  # absolute form
        (b"POST", b"/api/v1/a%20b/telemetry", Endpoint.TELEMETRY, "a b"),  # percent-decoded token
    ],
)
def test_known_routes(method: bytes, target: bytes, endpoint: Endpoint, token: str | None) -> None:
    match = resolve(method, target)
    assert isinstance(match, Match)
    assert match.endpoint is endpoint
    assert match.token == token


def test_query_is_split_off() -> None:
    match = resolve(b"GET", b"/api/v1/T/attributes?clientKeys=a,b&sharedKeys=x")
    assert isinstance(match, Match)
    assert match.query == b"clientKeys=a,b&sharedKeys=x"


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/api/v1/T/unknown",
        b"/api/v1/T/telemetry/",  # trailing slash is another path
        b"/api/v1//telemetry",  # empty token
        b"/api/v1/telemetry",  # no token at all
        b"/api/v2/T/telemetry",
        b"/api/v1/T/rpc/12/x",  # the downlink's rpc/{id} takes one segment
        b"/api/v1/T/attributes/updates/x",
        b"/healthz",
        b"*",
        b"example.com:443",
    ],
)
def test_unknown_paths_are_404(target: bytes) -> None:
    assert resolve(b"POST", target) == Miss(404)
    assert resolve(b"GET", target) == Miss(404)


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        (b"GET", b"/api/v1/T/telemetry", b"POST"),
        (b"PUT", b"/api/v1/T/attributes", b"GET, POST"),
        (b"DELETE", b"/api/v1/T/claim", b"POST"),
        (b"POST", b"/health", b"GET"),
    ],
)
def test_wrong_method_is_405_with_allow(method: bytes, target: bytes, allow: bytes) -> None:
    assert resolve(method, target) == Miss(405, allow)


def test_pattern_rows_slot_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """How the downlink issue adds `rpc/{id}`: one row, nothing else."""
    monkeypatch.setitem(routes.DEVICE_PATTERNS, b"rpc/{id}", {b"POST": Endpoint.CLAIM})
    match = resolve(b"POST", b"/api/v1/T/rpc/42")
    assert isinstance(match, Match)
    assert (match.endpoint, match.token, match.param) == (Endpoint.CLAIM, "T", "42")
    assert resolve(b"POST", b"/api/v1/T/rpc/42/x") == Miss(404)
    assert resolve(b"POST", b"/api/v1/T/rpc/") == Miss(404)
    assert resolve(b"GET", b"/api/v1/T/rpc/42") == Miss(405, b"POST")


def test_query_values() -> None:
    assert query_values(b"") == {}
    assert query_values(b"clientKeys=a,b&sharedKeys=x%2Cy") == {"clientKeys": "a,b", "sharedKeys": "x,y"}
    assert query_values(b"a=1&a=2&b") == {"a": "1", "b": ""}  # the first of repeated names wins
    assert query_values(b"k=hello+world&&=x") == {"k": "hello world"}
    assert query_values(b"k=%ff") == {"k": "\ufffd"}


def _parse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    found: dict[bytes, bytes] = {}
    body = bytearray()

    class Collect:
        def on_header(self, name: bytes, value: bytes) -> None:
            found[name.lower()] = value

        def on_body(self, chunk: bytes) -> None:
            body.extend(chunk)

    parser = httptools.HttpResponseParser(Collect())
    parser.feed_data(data)
    return parser.get_status_code(), found, bytes(body)


def test_response_bytes_parse_as_http() -> None:
    date = http_date(0)
    assert date == b"Thu, 01 Jan 1970 00:00:00 GMT"
    status, headers, body = _parse(response(400, date, Persist.CLOSE, b'{"error":"x"}', b"application/json"))
    assert (status, body) == (400, b'{"error":"x"}')
    assert headers[b"content-length"] == b"13"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert headers[b"date"] == date
    status, headers, body = _parse(response(503, date, Persist.KEEP, b"{}", b"", b"Retry-After: 1\r\n"))
    assert headers[b"retry-after"] == b"1"
    assert b"connection" not in headers


def test_empty_responses_per_persistence_and_second() -> None:
    table = EmptyResponses(100.2)
    assert table.table[Persist.KEEP][200] == b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Length: 0\r\n\r\n" % http_date(
        100
    )
    assert b"Connection: keep-alive\r\n" in table.table[Persist.KEEP_10][401]
    assert b"Connection: close\r\n" in table.table[Persist.CLOSE][404]
    before = table.table
    table.refresh(100.9)
    assert table.table is before  # same second: nothing rebuilt
    table.refresh(101.0)
    assert table.date == http_date(101)
    assert table.table[Persist.KEEP][200] != before[Persist.KEEP][200]
