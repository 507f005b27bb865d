"""The HTTP side of the downlink (spec §3): long polls, RPC replies, client-side RPC.

- ``GET .../rpc?timeout=ms``: a long poll, a one-shot ``DownlinkSession`` subscribed to RPC. 200
  ``{"id","method","params"}`` (the RPC is delivered when the answer is written), 408 with no body when
  nothing came in time.
- ``GET .../attributes/updates?timeout=ms``: the same for shared-attribute updates, 200
  ``{"k":v,...,"deleted":[..]}``.
- ``POST .../rpc/{id}``: the device's reply to RPC ``id`` -> 200 (404 when no RPC with that id is pending,
  400 when the id is not an integer).
- ``POST .../rpc`` ``{"method","params"}``: client-side RPC -> 200 with the backend's reply, or
  ``{"error":"timeout"}``. A client that sends EOF while it waits is no longer waited for: the request
  (already recorded for the backend) is withdrawn, the backend's late reply dropped, and the connection
  answers 400 as a withdrawn poll does and closes, instead of holding its slot until the timeout.

``timeout`` is milliseconds; 0 or absent means ThingsBoard's HTTP_REQUEST_TIMEOUT (60 s), and it is capped at
its HTTP_MAX_REQUEST_TIMEOUT (300 s). A poll whose client goes away is withdrawn at once, so an RPC is never
handed to a connection that can no longer write it. "Goes away" is the client's EOF, which is all a server sees
of a client that closed, and also of one that only half-closed (``shutdown(SHUT_WR)``) and still reads: that
one is answered 400 "the client closed its side of the connection" (never a false 503 "shutting down"). A
poll ended by the gateway's shutdown gets 503 and ``Connection: close``; by its device's removal, 401.

Every 400 is counted in ``tb_gateway_refusals_total``: ``bad_request`` for a bad ``timeout`` or RPC id,
``bad_payload`` for a client-side RPC body that is not ``{"method","params"}`` JSON (as for telemetry); the
400 to a poll whose client left is not (nobody may read it: a client that gave up is no refusal).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from tb_gateway.downlink.client_rpc import parse_request
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.sessions import Delivery, Feature, RpcCall
from tb_gateway.errors import PayloadError
from tb_gateway.http.handlers import Finish, Handler, Pending, Request
from tb_gateway.http.routes import Endpoint, query_values
from tb_gateway.http.wire import Persist, Reply, error, json_answer
from tb_gateway.normalize import parse_json
from tb_gateway.records import DeviceIdentity, Transport

HTTP = Transport.HTTP
DEFAULT_POLL_MS = 60_000  # ThingsBoard's HTTP_REQUEST_TIMEOUT, for timeout=0 or none
MAX_POLL_MS = 300_000  # ThingsBoard's HTTP_MAX_REQUEST_TIMEOUT
TIMED_OUT = 408
SHUTTING_DOWN = 503
REVOKED = 401
CLIENT_LEFT = 400  # EOF from the client: gone, or half-closed and still reading

Refused = Callable[[DeviceIdentity | None, Transport, str, str], None]  # DeviceApi.refused


class LongPoll:
    """One waiting ``GET .../rpc`` or ``.../attributes/updates``: takes one message, then is done."""

    transport = HTTP
    connection = False

    def __init__(
        self,
        hub: Downlink,
        device: DeviceIdentity,
        feature: Feature,
        timeout_s: float,
        closed: asyncio.Future[None] | None,
    ) -> None:
        self.device = device
        self._hub = hub
        self._closed = closed  # the connection's: done when the client went away
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future[dict[str, Any] | int] = loop.create_future()
        self._timer = loop.call_later(timeout_s, self._end, TIMED_OUT)
        if closed is not None:
            closed.add_done_callback(self.withdraw)
        hub.attach(self)  # the device is held here while it polls (another process routes its RPCs to us)
        hub.subscribe(self, feature)  # may answer at once (a pending RPC)

    def push_rpc(self, call: RpcCall) -> Delivery:
        if self.answer.done():
            return Delivery.REFUSED
        self._end(call.body())
        return Delivery.DELIVERED

    def push_attributes(self, update: dict[str, Any]) -> None:
        if not self.answer.done():
            self._end(update)

    def close(self, reason: str) -> None:
        self._end(REVOKED if reason == "revoked" else SHUTTING_DOWN)

    def withdraw(self, _closed: object = None) -> None:
        """The client sent EOF: nothing may be handed to this poll any more (module docstring)."""
        self._timer.cancel()
        self._hub.detach(self)
        if not self.answer.done():
            self.answer.set_result(CLIENT_LEFT)

    def _end(self, result: dict[str, Any] | int) -> None:
        self._timer.cancel()
        self._hub.detach(self)
        if self._closed is not None:  # a keep-alive connection polls many times: drop our callback
            self._closed.remove_done_callback(self.withdraw)
        if not self.answer.done():
            self.answer.set_result(result)


def _finish(request: Request, result: dict[str, Any] | int, *, retry_after: bytes = b"") -> Reply:
    if isinstance(result, int):
        if result == SHUTTING_DOWN:  # the hub closes polls before the connections drain: close this one now
            request.persist = Persist.CLOSE
            return error(SHUTTING_DOWN, "shutting down", retry_after)  # try again (another instance, or later)
        if result == CLIENT_LEFT:
            return error(CLIENT_LEFT, "the client closed its side of the connection: a long poll needs it open")
        return result
    return json_answer(200, result)


def _reply_json(request: Request, reply: Any) -> Reply:
    return json_answer(200, reply)


def _client_rpc_answer(request: Request, result: Any) -> Reply:
    if result is _CLIENT_GONE:
        return error(CLIENT_LEFT, "the client closed its side of the connection: a client-side RPC needs it open")
    return json_answer(200, result)


_CLIENT_GONE = object()


def _until_client_left(reply: asyncio.Future[Any], closed: asyncio.Future[None]) -> asyncio.Future[Any]:
    """The reply, unless the client sends EOF first: then the RPC is withdrawn (``reply`` cancelled, so the
    hub drops the backend's late answer) and the connection answers and closes at once, not after
    CLIENT_SIDE_RPC_TIMEOUT_SECONDS (module docstring)."""
    answer: asyncio.Future[Any] = reply.get_loop().create_future()

    def replied(done: asyncio.Future[Any]) -> None:
        closed.remove_done_callback(left)  # a keep-alive connection asks many times: drop our callback
        if answer.done():
            return
        if done.cancelled():
            answer.cancel()
        else:
            answer.set_result(done.result())

    def left(_closed: object) -> None:
        if not answer.done():
            answer.set_result(_CLIENT_GONE)
        reply.cancel()

    reply.add_done_callback(replied)
    closed.add_done_callback(left)
    return answer


class HttpDownlink:
    def __init__(self, hub: Downlink, refused: Refused, retry_after: bytes = b"") -> None:
        self.hub = hub
        self.refused = refused
        self._finish: Finish = functools.partial(_finish, retry_after=retry_after)  # a 503's Retry-After header

    def handlers(self) -> dict[Endpoint, Handler]:
        return {
            Endpoint.RPC_POLL: lambda request: self.poll(request, Feature.RPC),
            Endpoint.ATTRIBUTE_UPDATES: lambda request: self.poll(request, Feature.ATTRIBUTES),
            Endpoint.RPC_REPLY: self.rpc_reply,
            Endpoint.CLIENT_RPC: self.client_rpc,
        }

    def poll(self, request: Request, feature: Feature) -> Reply | Pending:
        device, match = request.device, request.match
        assert device is not None and match is not None
        try:
            timeout_ms = int(query_values(match.query).get("timeout") or 0)
        except ValueError:
            return self._bad(device, "bad_request", "timeout must be an integer (milliseconds)")
        if timeout_ms < 0:
            return self._bad(device, "bad_request", "timeout must not be negative")
        self.hub.activity(device, HTTP)
        timeout_s = min(timeout_ms or DEFAULT_POLL_MS, MAX_POLL_MS) / 1000
        poll = LongPoll(self.hub, device, feature, timeout_s, request.closed)
        return poll.answer, self._finish

    def rpc_reply(self, request: Request) -> Reply:
        device, match = request.device, request.match
        assert device is not None and match is not None and match.param is not None
        self.hub.activity(device, HTTP)
        try:
            rpc_id = int(match.param)
        except ValueError:
            return self._bad(device, "bad_request", "the request id must be an integer")
        body = request.body if type(request.body) is bytes else bytes(request.body)
        if not self.hub.rpc_replied(device.id, rpc_id, body):
            return error(404, f"no RPC {rpc_id} is waiting for a reply")
        return 200

    def client_rpc(self, request: Request) -> Reply | Pending:
        device = request.device
        assert device is not None
        self.hub.activity(device, HTTP)
        body = request.body if type(request.body) is bytes else bytes(request.body)
        try:
            method, params = parse_request(parse_json(body))
        except PayloadError as exc:
            return self._bad(device, "bad_payload", str(exc))
        reply = self.hub.client_rpc(device, HTTP, method, params)
        closed = request.closed
        if reply.done() or closed is None:
            return reply, _reply_json
        return _until_client_left(reply, closed), _client_rpc_answer

    def _bad(self, device: DeviceIdentity, reason: str, message: str) -> Reply:
        """400, counted in tb_gateway_refusals_total under ``reason``."""
        self.refused(device, HTTP, reason, message)
        return error(400, message)
