"""One HTTP/1.1 connection: an ``asyncio.Protocol`` around ``httptools``, answering requests strictly in order.

- A request is queued when its *headers* are complete, already routed (404/405) and size-checked (413 from
  Content-Length; a chunked body is counted as it streams), and its token is checked at once from the auth
  cache, so a refused request's body is discarded, never buffered. A token the cache does not know is looked
  up in a task while reading pauses.
- ``_advance`` answers the head of the queue as far as it can without waiting; what must wait (a lookup,
  the pipeline's delivery confirmation) calls ``_advance`` again when done. No task per connection or
  request: one future callback per acknowledged message. A 200 is written only once the pipeline future
  says DELIVERED (DESIGN.md §4).
- Bounded: the head at ``MAX_HEAD_BYTES``, a body at MAX_PAYLOAD_SIZE; reading pauses while
  ``MAX_PIPELINED`` requests wait for answers or the client does not read ours. A head is sized per head,
  wherever it arrives: a complete one from its callbacks (request line and header lines, at
  ``on_headers_complete``); one still incomplete after a read by the bytes it has taken since it began. Where
  it began in a read that also held earlier messages is the bytes those took (their heads as sized from
  their callbacks, their bodies as fed, 5 bytes per chunk's framing): a little early at most (extra
  whitespace, longer chunk-size lines), so never another request's bytes.
- Timeouts are checked by the server's sweep against ``deadline``: a slow head or body gets 408 and a close;
  an idle keep-alive connection, or one that never sends a byte, is closed silently. The first request's
  head is timed from the moment the connection opened, the others' from their first byte.
- ``Upgrade`` is never offered (RFC 9110 §7.8: the request is answered as if it were absent), and the
  connection closes after its answer. httptools skips the body of an Upgrade request (it reads it as the new
  protocol's bytes), so when one is declared a second parser, given a made-up head with the same framing,
  reads it; nothing after it is read. CONNECT is refused (no route) and closes the same way.
- A connection that ends in error (400 malformed, 408, 413, 431) is answered, half-closed and drained for
  ``LINGER_S`` so the client reads the answer instead of a reset.
- The fast lane (C, ``_lanes.c``: the C base class ``FastConnection`` owns ``data_received``): a read that is
  exactly one simple device message (a whole POST with a Content-Length, nothing httptools would read
  differently: ``http_post_parse``) from a device the auth cache knows, on a connection with nothing else in
  progress and a client that reads our answers, is posted without httptools' callbacks or a per-request
  ``Request`` (the connection's one reusable ``fast`` request stands in the queue until the pipeline
  answers), and its 200 is written from the ticket's callback. Anything else goes to ``_read``, the general
  path above, and whatever the lane does not answer plainly (a bad payload, a refusal, a delivery that is not
  a plain success on an unchanged connection) to ``_fast_failed`` / ``_fast_answered`` / ``_fast_resume``.
  Without the C extension every read takes the general path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from tb_gateway.errors import AddressBlocked, CredentialsUnavailable, PayloadError
from tb_gateway.http.handlers import HTTP, Finish, Request, too_many
from tb_gateway.http.routes import Miss
from tb_gateway.http.wire import CONTINUE, Answer, Persist, Reply, error, render
from tb_gateway.pipeline import when_settled
from tb_gateway.records import DeviceIdentity
from tb_gateway.sinks.base import Outcome

try:  # the fast lane and the state it reads on every request, in C (_lanes.c)
    from tb_gateway._speedups import FastConnection as _Base
except ImportError:  # pragma: no cover - built without a C compiler: every request takes the general path

    class _Base:  # type: ignore[no-redef]
        """Without the C extension: no fast lane, httptools reads everything."""

        def data_received(self, data: bytes) -> None:
            connection = cast("HttpConnection", self)
            connection.api.pipeline.poll()  # answers whose batch is durable go out now
            if not connection.stopped:
                connection._read(data)


if TYPE_CHECKING:
    from tb_gateway.http.server import HttpServer

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; nginx's default large_client_header_buffers is 4 x 8 KiB
MAX_PIPELINED = 32  # requests read ahead of their answers before reading pauses
MAX_QUEUED = 4 * MAX_PIPELINED  # one read can hold more: beyond this the client is refused (400) and closed
LINGER_S = 2.0  # after an error answer: time for the client to read it before the socket closes

REASONS = {  # refusal reasons counted in tb_gateway_refusals_total (401: auth failures, counted by auth)
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    431: "headers_too_large",
}

# what the connection's one deadline is for
NO_TIMER, FRESH, IDLE, HEAD, BODY, LINGER = range(6)


class _Stop(Exception):
    """Raised inside a parser callback to stop httptools mid-chunk once the connection is failing."""


class _UpgradeBody:
    """The callbacks of the parser that reads an Upgrade request's body (``HttpConnection._upgraded``)."""

    def __init__(self, connection: HttpConnection) -> None:
        self.on_body = connection.on_body
        self.connection = connection

    def on_message_complete(self) -> None:
        connection = self.connection
        connection.on_message_complete()
        connection._no_more_requests()  # what follows is another protocol's: read no more
        raise _Stop


class HttpConnection(_Base, asyncio.Protocol):
    """One client connection. ``data_received`` is the C base's (the fast lane, which hands everything else
    to ``_read``); the attributes it shares with this class (queue, current, fast, timer, deadline, the
    flags) are its member slots."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.lane = server.lane
        self.api = server.api
        self.handlers = server.handlers
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.address: str | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.peer_gone: asyncio.Future[None] = self.loop.create_future()  # EOF or closed: long polls end
        self.queue: deque[Request] = deque()
        self.current: Request | None = None  # the request whose body is being read
        self.busy = False  # the head of the queue waits for a lookup or a delivery
        self.url = b""
        self.content_length = -1
        self.expect = False
        self.transfer_encoding: bytes | None = None
        self.upgrading = False  # an Upgrade request with a body: httptools' message end is not its end
        self.head_bytes = 0  # the head so far, from its callbacks
        self.head_raw = 0  # bytes an incomplete head has taken from earlier reads, minus where it began in this one
        self.consumed = 0  # bytes of this read taken by complete heads and bodies (as far as callbacks tell)
        self.timer = FRESH
        self.deadline = 0.0
        self.paused = False
        self.write_paused = False
        self.stopped = False  # parse nothing more: failing, draining, or the client sent EOF
        self.closing = False  # the last answer is written
        self.lingering = False
        self.lost = False
        self.fast = Request(None, None, Persist.KEEP)  # the fast lane's request, reused (see _fast)
        self.fast.complete = True  # whole when it is queued, always
        self._ack_latency = self.handlers.ack_latency

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if peer else None  # brute-force protection counts per address
        server = self.server
        if len(server.connections) >= server.max_connections or server.draining:
            reason = "shutting_down" if server.draining else "max_connections"
            self.api.refused(None, HTTP, reason)
            answer = self.handlers.overloaded(reason.replace("_", " "))
            transport.write(render(answer, server.responses, Persist.CLOSE))
            transport.close()
            self.stopped = self.closing = True
            self.closed.set_result(None)
            return
        server.connections.add(self)
        server.connected.inc()
        self.deadline = self.loop.time() + server.header_timeout

    def _read(self, data: bytes) -> None:
        """A read the fast lane did not take (``data_received`` polled the pipeline and checked ``stopped``)."""
        self.consumed = 0
        upgrade = -1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            upgrade = exc.args[0]  # handled below, not in here: a _Stop raised then must not chain to this
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                log.error("HTTP request handling failed", exc_info=exc.__context__)
                self.api.metrics.errors.labels(component="http").inc()
                self._fail(error(500, "internal error"))
        except httptools.HttpParserError as exc:
            self._fail(error(400, f"malformed HTTP request: {exc}"), "bad_request")
        if upgrade >= 0:
            self._upgraded(data, upgrade)
            return
        if self.timer == HEAD:  # the head is still incomplete: count what it has taken so far (module docstring)
            self.head_raw += len(data)
            if self.head_raw > MAX_HEAD_BYTES:
                self._fail(431, "headers_too_large")
        self._sync_reading()

    # ---- the fast lane's hand-offs (_lanes.c takes the request, these answer what it does not) ----

    def _fast_failed(self, request: Request, exc: Exception) -> None:
        """Posting the fast lane's message raised: a bad payload (already counted and logged) or a failure."""
        if isinstance(exc, PayloadError):
            self._finish(request, error(400, str(exc)))
            return
        log.error("HTTP device message handler failed", exc_info=exc)
        self.api.metrics.errors.labels(component="http").inc()
        self._finish(request, error(500, "internal error"))

    def _fast_answered(self, request: Request, outcome: Outcome) -> None:
        """Answered at once (a refusal is already counted, or nothing to store)."""
        self._finish(request, self.handlers.outcome(request, outcome))

    def _fast_resume(self, future: asyncio.Future[Any]) -> None:
        """The fast lane's message is settled, but not plainly delivered on an unchanged connection: the general
        path's answer."""
        self._resume(self.fast, self.handlers.delivered, future)

    def eof_received(self) -> bool | None:
        if not self.peer_gone.done():
            self.peer_gone.set_result(None)
        if self.current is not None and not self.current.complete:
            self._fail(error(400, "the connection closed in the middle of a request"), "bad_request")
        self.stopped = True
        keep_open = bool(self.queue)  # our half stays open until the answers are written
        self._go_on()
        return True if keep_open else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closing = True
        self.server.connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.peer_gone.done():
            self.peer_gone.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._go_on()

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        self.url = b""
        self.content_length = -1
        self.expect = False
        self.transfer_encoding = None
        self.head_bytes = 0
        self.head_raw = -self.consumed  # bytes of earlier messages in this read are not this head's
        if self.timer != FRESH:  # the first request's head is timed from the connection's opening
            self.deadline = self.loop.time() + self.server.header_timeout
        self.timer = HEAD

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        self.head_bytes += size + len(value) + 4  # "name: value\r\n"
        if size == 14 and name.lower() == b"content-length":
            self.content_length = int(value)
        elif size == 6 and name.lower() == b"expect":
            self.expect = value.lower() == b"100-continue"
        elif size == 17 and name.lower() == b"transfer-encoding":
            self.transfer_encoding = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        server = self.server
        method = parser.get_method()
        size = len(method) + len(self.url) + self.head_bytes + 14  # "M URL HTTP/1.1\r\n", headers, "\r\n"
        if size > MAX_HEAD_BYTES:
            self._fail(431, "headers_too_large")
            raise _Stop
        self.consumed = max(size - self.head_raw, 0)  # where the next message begins in this read
        self.timer = BODY
        self.deadline = self.loop.time() + server.body_timeout
        if self.content_length > server.max_payload:  # before routing, as ThingsBoard's size filter
            self._fail(413, "too_large")
            raise _Stop
        if len(self.queue) >= MAX_QUEUED:
            self._fail(error(400, f"more than {MAX_QUEUED} pipelined requests"), "bad_request")
            raise _Stop
        if parser.should_upgrade():  # not offered: answered as a plain request, then the connection closes
            persist = Persist.CLOSE
            self.upgrading = method != b"CONNECT" and (self.content_length > 0 or self.transfer_encoding is not None)
        elif not parser.should_keep_alive() or server.draining:
            persist = Persist.CLOSE
        else:
            persist = Persist.KEEP if parser.get_http_version() == "1.1" else Persist.KEEP_10
        route, credentials, handler, takes_body, _ = server.route(method, self.url)
        if isinstance(route, Miss):
            request = Request(None, None, persist)
            extra = b"Allow: %s\r\n" % route.allow if route.allow else b""
            self._refuse(request, Answer(405, extra=extra) if extra else route.status, REASONS[route.status])
        else:
            request = Request(route, credentials, persist, handler, takes_body)
            request.closed = self.peer_gone
        request.expect = self.expect
        self.queue.append(request)
        self.current = request
        if len(self.queue) == 1:
            self._advance()

    def on_body(self, data: bytes) -> None:
        request = self.current
        assert request is not None
        self.consumed += len(data)
        request.size += len(data)
        if request.size > self.server.max_payload:  # a chunked body, counted as it streams
            self._fail(413, "too_large")
            raise _Stop
        if request.discard:
            return
        if not request.body:
            request.body = data
        else:
            if type(request.body) is bytes:
                request.body = bytearray(request.body)
            request.body += data

    def on_chunk_complete(self) -> None:
        self.consumed += 5  # at least "0\r\n" before the chunk's data and "\r\n" after it

    def on_message_complete(self) -> None:
        if self.upgrading:
            return  # httptools skipped the body: _upgraded reads it
        request = self.current
        assert request is not None
        request.complete = True
        request.done_at = time.perf_counter()
        self.current = None
        self.timer = NO_TIMER
        self.deadline = 0.0
        if self.queue and request is self.queue[0]:
            self._advance()

    # ---- answering, in order ----

    def _go_on(self) -> None:
        """From outside the parser: answer what can be answered, then read again if the new head allows."""
        self._advance()
        self._sync_reading()

    def _advance(self) -> None:
        """Answer queued requests in order, as far as possible without waiting."""
        queue = self.queue
        while queue and not self.busy and not self.closing:
            request = queue[0]
            if not request.authenticated and not self._authenticate(request):
                return  # looked up in a task, which advances again
            if not request.complete and not request.fatal:
                if request.expect:
                    self._expect(request)
                if not request.fatal:
                    return  # on_message_complete advances again
            if self.write_paused:
                return  # resume_writing advances again
            if request.refusal is not None:
                self._finish(request, request.refusal)
                continue
            handler = request.handler
            assert handler is not None and request.match is not None
            try:
                reply = handler(request)
            except Exception:
                log.exception("HTTP %s handler failed", request.match.endpoint.value)
                self.api.metrics.errors.labels(component="http").inc()
                reply = error(500, "internal error")
            if type(reply) is tuple:
                future, finish = reply
                self.busy = True
                when_settled(future, functools.partial(self._resume, request, finish))
                return
            self._finish(request, cast(Reply, reply))

    def _resume(self, request: Request, finish: Finish, future: asyncio.Future[Any]) -> None:
        self.busy = False
        try:
            reply: Reply
            if future.cancelled():
                reply = error(503, "shutting down", self.handlers.retry_after)
            else:
                reply = finish(request, future.result())
        except Exception:
            log.exception("HTTP answer failed")
            self.api.metrics.errors.labels(component="http").inc()
            reply = error(500, "internal error")
        if not self.closing:
            self._finish(request, reply)
            self._go_on()

    def _finish(self, request: Request, reply: Reply) -> None:
        """Write one answer and go on, close, or linger after an error."""
        persist = self._persist(request)
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(render(reply, self.server.responses, persist))
        self.queue.popleft()
        if request.fatal:
            self._linger()
        elif persist is Persist.CLOSE:
            self.close()
        elif not self.queue:
            if self.stopped:
                self.close()
            elif self.timer == NO_TIMER:
                self.timer = IDLE
                self.deadline = self.loop.time() + self.server.idle_timeout
        self._sync_reading()

    def _persist(self, request: Request) -> Persist:
        """Decided when the answer is written: a drain may have begun while the request was in the pipeline."""
        if request.fatal or (self.stopped and len(self.queue) == 1):
            return Persist.CLOSE
        return cast(Persist, request.persist)

    def _authenticate(self, request: Request) -> bool:
        """Decide from the auth cache (no task switch); else look up in a task. True when decided now."""
        credentials = request.credentials
        assert credentials is not None
        try:
            known, device = self.api.authenticate_cached(credentials, HTTP, self.address)
        except AddressBlocked as blocked:
            self._refuse(request, too_many("address blocked", blocked.retry_after_s), "address_blocked")
            return True
        if known:
            self._identify(request, device)
            return True
        self.busy = True
        task = self.loop.create_task(self.api.authenticate(credentials, HTTP, self.address))
        self.server.track(task)
        task.add_done_callback(functools.partial(self._looked_up, request))
        return False

    def _looked_up(self, request: Request, task: asyncio.Task[DeviceIdentity | None]) -> None:
        self.busy = False
        if task.cancelled():
            self._refuse(request, error(503, "shutting down", self.handlers.retry_after))
        elif isinstance(blocked := task.exception(), AddressBlocked):  # blocked by a lookup of a parallel request
            self._refuse(request, too_many("address blocked", blocked.retry_after_s), "address_blocked")
        elif isinstance(task.exception(), CredentialsUnavailable):
            self.api.refused(None, HTTP, "auth_unavailable", str(task.exception()))
            self._refuse(request, self.handlers.overloaded("credentials cannot be checked now"))
        elif task.exception() is not None:
            log.error("token lookup failed", exc_info=task.exception())
            self.api.metrics.errors.labels(component="auth").inc()
            self._refuse(request, error(500, "internal error"))
        else:
            self._identify(request, task.result())
        self._go_on()

    def _identify(self, request: Request, device: DeviceIdentity | None) -> None:
        request.authenticated = True
        if device is None:
            self._refuse(request, 401)  # counted by the auth service
        else:
            request.device = device

    def _expect(self, request: Request) -> None:
        """``Expect: 100-continue``: go ahead, or refuse before the body and close (it may or may not come)."""
        request.expect = False
        if request.refusal is None:
            assert self.transport is not None
            self.transport.write(CONTINUE)
        else:
            request.fatal = True
            self.stopped = True

    # ---- refusals and failures ----

    def _refuse(self, request: Request, reply: Reply, reason: str = "") -> None:
        """Answer without a handler; the body (if any) is discarded, never buffered."""
        request.refusal = reply
        request.discard = True
        request.authenticated = True
        request.body = b""
        if reason:
            self.api.refused(None, HTTP, reason)

    def _fail(self, reply: Reply, reason: str = "") -> None:
        """Answer ``reply`` after what is queued, then close; parse nothing more."""
        if self.stopped:
            return
        self.stopped = True
        request = self.current
        if request is None:
            request = Request(None, None, Persist.CLOSE)
            self.queue.append(request)
        self._refuse(request, reply, reason)
        request.fatal = True
        self._advance()

    def _upgraded(self, data: bytes, offset: int) -> None:
        """httptools stopped at the end of an Upgrade / CONNECT head. An Upgrade request's body is read by a
        parser of its own (module docstring); then, or at once, no more requests: answer, then close."""
        if not self.upgrading:
            self._no_more_requests()
            self._sync_reading()
            return
        self.upgrading = False
        framing = b"Content-Length: %d" % self.content_length
        if self.transfer_encoding is not None:
            framing = b"Transfer-Encoding: " + self.transfer_encoding
        self.parser = httptools.HttpRequestParser(_UpgradeBody(self))
        self.parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)  # the same framing: accepted before
        self.data_received(data[offset:])  # what follows the head in this read (possibly nothing)

    def _no_more_requests(self) -> None:
        """An Upgrade / CONNECT: answer what was asked, then close (no protocol switch is offered)."""
        if self.current is not None and not self.current.complete:
            self._fail(error(400, "protocol upgrade is not supported"), "bad_request")
        self.stopped = True
        if self.queue:
            self.queue[-1].persist = Persist.CLOSE
        else:
            self.close()

    def expire(self) -> None:
        """The server's sweep found ``deadline`` passed."""
        timer = self.timer
        if timer in (HEAD, BODY):
            if self.paused:  # we stopped reading, not the client: its clock does not run
                server = self.server
                self.deadline = self.loop.time() + (server.header_timeout if timer == HEAD else server.body_timeout)
                return
            log.debug("HTTP client too slow (%s); answering 408", "head" if timer == HEAD else "body")
            self.deadline = 0.0
            self._fail(408, "timeout")
            self._sync_reading()
        else:  # FRESH, IDLE: nothing asked, nothing owed; LINGER: the error answer had its time
            self.deadline = 0.0
            self.close()

    def begin_drain(self) -> None:
        """Shutdown: answer what was admitted, refuse a half-read request, then close."""
        if self.lingering or not self.queue:
            self.close()
            return
        self.stopped = True
        current = self.current
        if current is not None and not current.complete:
            self._refuse(current, error(503, "shutting down", self.handlers.retry_after), "shutting_down")
            current.fatal = True
        self._go_on()

    # ---- the socket ----

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _linger(self) -> None:
        """Half-close after an error answer and discard input for a while, so the client reads the answer."""
        transport = self.transport
        self.closing = self.stopped = True
        if transport is None or transport.is_closing():
            return
        self.lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = LINGER
        self.deadline = self.loop.time() + LINGER_S

    def _sync_reading(self) -> None:
        """Pause reading while a token is being looked up or too many answers are pending; else read."""
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            return
        current = self.current
        if self.lingering:
            pause = False
        elif self.server.draining:
            pause = True
        else:
            pause = not self.stopped and (
                len(self.queue) >= MAX_PIPELINED or (current is not None and not current.authenticated)
            )
        if pause != self.paused:
            self.paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()
