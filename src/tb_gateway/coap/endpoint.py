"""Sans-IO CoAP server endpoint (RFC 7252 messaging, RFC 7641 Observe, RFC 7959 Block1/Block2).

Shape borrowed from aioquic: the adapter feeds ``receive_datagram(data, addr, now)``, sends what
``datagrams_to_send(now)`` returns, and calls ``handle_timer(now)`` when ``get_timer()`` says so. No socket,
no clock, no asyncio: every timing decision takes ``now`` (seconds, any monotonic origin) as an argument, so
tests drive retransmissions and timeouts with an explicit clock.

What the endpoint does on its own, so the application only ever sees one ``RequestReceived`` per request
and answers it once with ``respond``:

- de-duplication: a retransmitted CON gets the same reply again (the piggybacked response, or the empty ACK
  of a separate response); a duplicate NON is dropped. Remembered for EXCHANGE_LIFETIME (CON) or
  NON_LIFETIME (NON), and never more than ``max_exchanges`` at once (oldest forgotten first) nor more than
  ``exchanges_per_peer`` of one peer (its oldest forgotten first, as Californium's per-peer de-duplicator);
- piggybacking: a CON answered within ``piggyback_timeout_s`` gets its response in the ACK; otherwise the
  endpoint sends the empty ACK at the deadline and the response later goes out as a CON of its own,
  retransmitted with exponential back-off until ACKed or MAX_RETRANSMIT is reached;
- pings (empty CON) get a Reset; malformed CONs get a Reset, every other malformed datagram is dropped
  (RFC 7252 §4.2, §4.3); a request with an unknown critical option gets 4.02 (CON) or is dropped (NON);
- Block1 reassembly (2.31 Continue per block, one ``RequestReceived`` with the whole body) and Block2
  slicing of responses larger than one block;
- Observe: ``observe(exchange)`` registers the requester, ``notify`` sends notifications with increasing
  sequence numbers (CON ones retransmitted), and deregistration by GET Observe=1 or by a Reset is reported
  as ``ObservationCancelled``.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tb_gateway.coap.blockwise import Reassembler
from tb_gateway.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    Block,
    CoapFormatError,
    Code,
    Message,
    Option,
    Options,
    decode,
    decode_uint,
    encode,
    encode_uint,
)
from tb_gateway.coap.expiring import ExpiringMap, PeerWindowedMap

try:  # the de-duplication table in C (_seen.c): PeerWindowedMap's rules without a tuple and a float per message
    from tb_gateway._speedups import SeenTable
    from tb_gateway._speedups import drop_front as _drop_front
except ImportError:  # pragma: no cover - built without a C compiler
    SeenTable = None  # type: ignore[misc,assignment]
    _drop_front = None  # type: ignore[assignment]
from tb_gateway.construct import constructor

Address = Any  # whatever the transport uses as a peer address (a hashable tuple for UDP sockets)

# Options the endpoint or the gateway understands; any other *critical* option makes a request fail (4.02).
KNOWN_OPTIONS = frozenset(
    {
        Option.IF_MATCH,
        Option.URI_HOST,
        Option.ETAG,
        Option.IF_NONE_MATCH,
        Option.OBSERVE,
        Option.URI_PORT,
        Option.URI_PATH,
        Option.CONTENT_FORMAT,
        Option.URI_QUERY,
        Option.ACCEPT,
        Option.BLOCK2,
        Option.BLOCK1,
        Option.SIZE2,
        Option.SIZE1,
    }
)
_URI_OPTIONS = frozenset({Option.URI_HOST, Option.URI_PORT, Option.URI_PATH, Option.URI_QUERY})
# Options a request may repeat (RFC 7252 §5.10); a second occurrence of any other is unrecognized (§5.4.5).
_REPEATABLE = frozenset({Option.IF_MATCH, Option.ETAG, Option.URI_PATH, Option.URI_QUERY})
_PROXY_OPTIONS = frozenset({Option.PROXY_URI, Option.PROXY_SCHEME})  # we are no proxy: 5.05 (§5.7.2)
# Known options the endpoint itself does not act on: skipped first, as every request carries several.
_PLAIN_OPTIONS = _URI_OPTIONS | {Option.CONTENT_FORMAT, Option.ACCEPT, Option.SIZE1}
# SeenTable finds an id by scanning its peer's window: fine for Californium's 64, not for a huge window
SEEN_TABLE_MAX_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Timers are RFC 7252 §4.8 defaults unless noted; every cap bounds memory under a flood."""

    piggyback_timeout_s: float = 0.5  # ThingsBoard's COAP_PIGGYBACK_TIMEOUT: then empty ACK + separate response
    ack_timeout_s: float = 2.0  # ACK_TIMEOUT
    ack_random_factor: float = 1.5  # ACK_RANDOM_FACTOR
    max_retransmit: int = 4  # MAX_RETRANSMIT
    exchange_lifetime_s: float = 247.0  # EXCHANGE_LIFETIME: how long a CON's reply is kept for duplicates
    non_lifetime_s: float = 145.0  # NON_LIFETIME
    max_exchanges: int = 100_000  # de-duplication entries (~0.5 KB each, 50 MB); the oldest go first
    exchanges_per_peer: int = 64  # and at most this many per peer, its newest (Californium's default too)
    max_body_bytes: int = 65_536  # MAX_PAYLOAD_SIZE: larger request bodies get 4.13 with Size1
    block_szx: int = 6  # 1024-byte blocks: the largest that fits an unfragmented IPv6 datagram (RFC 7252 §4.6)
    max_block_transfers: int = 1_000  # concurrent Block1 uploads; with max_body_bytes bounds their memory
    block_lifetime_s: float = 60.0  # an abandoned upload is dropped after this
    max_observations: int = 100_000  # registered observers; beyond it a GET Observe=0 is answered unobserved
    # an observer not heard from for this long (no registration, no ACK of a notification) is pinged with an
    # empty CON: a RST (or ACK) proves it alive; no answer after MAX_RETRANSMIT ends its observation, as an
    # unacknowledged CON notification does. RFC 7641 §4.5 asks for a CON at least every 24 hours.
    observer_check_s: float = 86_400.0
    max_notifications_in_flight: int = 8  # unacknowledged CON notifications per observer
    housekeeping_s: float = 1.0  # expiry sweeps run at most this often (keeps timer wake-ups rare)


PENDING, SEPARATE, ANSWERED = 0, 1, 2


class Observation:
    """A registered observer: one client address and token for one resource (RFC 7641 §3.1)."""

    __slots__ = ("active", "addr", "confirmable", "heard", "in_flight", "path", "query", "seq", "token")

    def __init__(self, addr: Address, token: bytes, path: tuple[str, ...], query: tuple[str, ...], con: bool):
        self.heard = 0.0  # when the client last showed it is there (registration, ACK, answered ping)
        self.addr = addr
        self.token = token
        self.path = path
        self.query = query
        self.confirmable = con  # notifications are CON when the registration was (ThingsBoard's rule)
        self.seq = 0
        self.in_flight = 0
        self.active = True


class Exchange:
    """One request the application answers exactly once, with ``Endpoint.respond``."""

    __slots__ = (
        "addr",
        "block1",
        "block2",
        "code",
        "confirmable",
        "deadline",
        "mid",
        "observation",
        "options",
        "payload",
        "received_at",
        "reply",
        "state",
        "token",
    )

    def __init__(self, addr: Address, msg: Message, now: float) -> None:
        self.addr = addr
        self.mid = msg.mid
        self.token = msg.token
        self.code = msg.code
        self.options = msg.options
        self.payload = msg.payload
        self.confirmable = msg.type == CON
        self.received_at = now
        self.state = PENDING
        self.deadline = 0.0
        self.reply: bytes | None = None  # what a duplicate of this request is answered with
        self.block1: Block | None = None  # the final block of a reassembled upload, echoed in the response
        self.block2: Block | None = None  # the Block2 option the client sent, if any
        self.observation: Observation | None = None

    @property
    def path(self) -> tuple[str, ...]:
        return tuple([v.decode("utf-8", "replace") for n, v in self.options if n == Option.URI_PATH])

    @property
    def query(self) -> tuple[str, ...]:
        return tuple([v.decode("utf-8", "replace") for n, v in self.options if n == Option.URI_QUERY])

    def uint_option(self, number: int) -> int | None:
        for n, value in self.options:
            if n == number:
                return decode_uint(value)
        return None

    @property
    def observe(self) -> int | None:
        """0 = register, 1 = deregister, None = a plain request (RFC 7641 §2)."""
        return self.uint_option(Option.OBSERVE)


@dataclass(frozen=True, slots=True)
class RequestReceived:
    exchange: Exchange


@dataclass(frozen=True, slots=True)
class ObservationCancelled:
    observation: Observation
    reason: str  # "deregistered" (GET Observe=1), "reset" (RST), "timeout" (CON notification or ping never ACKed)


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """The endpoint refused a request itself (option or Block1 error), already answered: for the counters."""

    exchange: Exchange
    reason: str  # bad_option, bad_request, incomplete, too_large, proxying_not_supported


@dataclass(frozen=True, slots=True)
class NotificationAcknowledged:
    observation: Observation
    mid: int


@dataclass(frozen=True, slots=True)
class NotificationTimedOut:
    observation: Observation
    mid: int


@dataclass(frozen=True, slots=True)
class ResponseTimedOut:
    """A separate (CON) response was never acknowledged; the client may have given up on it."""

    exchange: Exchange


request_received = constructor(RequestReceived)  # one per request: RequestReceived(...) without its frame

Event = (
    RequestReceived
    | RequestRefused
    | ObservationCancelled
    | NotificationAcknowledged
    | NotificationTimedOut
    | ResponseTimedOut
)
_BLOCK1_REASONS = {
    Code.BAD_REQUEST: "bad_request",
    Code.REQUEST_ENTITY_INCOMPLETE: "incomplete",
    Code.REQUEST_ENTITY_TOO_LARGE: "too_large",
}


class _Outgoing:
    """A CON we sent (separate response, notification or ping), retransmitted until ACKed."""

    __slots__ = ("addr", "attempts", "datagram", "done", "exchange", "mid", "observation", "ping", "timeout")

    def __init__(self, addr: Address, mid: int, datagram: bytes, timeout: float) -> None:
        self.addr = addr
        self.mid = mid
        self.datagram = datagram
        self.timeout = timeout
        self.attempts = 0
        self.done = False
        self.exchange: Exchange | None = None
        self.observation: Observation | None = None
        self.ping: Observation | None = None  # an empty CON asking whether this observer is still there


class Endpoint:
    def __init__(
        self,
        config: EndpointConfig | None = None,
        *,
        rng: Callable[[], float] = random.random,
        first_mid: int | None = None,
    ) -> None:
        self.config = config = config or EndpointConfig()
        self._rng = rng
        self._next_mid = int(rng() * 0x10000) & 0xFFFF if first_mid is None else first_mid
        # (peer, message id) -> the Exchange while unanswered, then only the bytes a duplicate gets back; the
        # same table in C where it is built (the C lane takes requests only then)
        self._seen: PeerWindowedMap[Address, Exchange | bytes] | SeenTable = (
            SeenTable(config.max_exchanges, config.exchanges_per_peer)
            if SeenTable is not None and 0 < config.exchanges_per_peer <= SEEN_TABLE_MAX_WINDOW
            else PeerWindowedMap(config.max_exchanges, config.exchanges_per_peer)
        )
        self._piggyback: deque[Exchange] = deque()
        self._outgoing: dict[tuple[Address, int], _Outgoing] = {}
        self._retransmit: list[tuple[float, int, _Outgoing]] = []
        self._observations: dict[tuple[Address, bytes], Observation] = {}
        # (due, n, observation): when to check each observer is still there (lazy: due again is pushed again)
        self._checks: list[tuple[float, int, Observation]] = []
        self._check_n = 0
        self._recent_non: ExpiringMap[tuple[Address, int], Observation] = ExpiringMap(config.max_observations)
        self._blocks = Reassembler(config.max_body_bytes, config.max_block_transfers, config.block_lifetime_s)
        # (peer, path, query) -> (code, body, options) of the last answer or notification sent in blocks there,
        # so its later blocks come from the same representation (RFC 7959 §2.4); bounded like Block1 uploads
        self._bodies: ExpiringMap[tuple[Address, tuple[str, ...], tuple[str, ...]], tuple[int, bytes, Options]]
        self._bodies = ExpiringMap(config.max_block_transfers)
        self._etag = 0
        self._outbox: list[tuple[bytes, Address]] = []
        self._sweep_at = 0.0
        self._by_type: tuple[Callable[[Message, Address, float], list[Event]], ...] = (
            self._on_request,
            self._on_request,
            self._on_ack,
            self._on_reset,
        )

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> list[Event]:
        if now >= self._sweep_at:
            self._sweep(now)
        try:
            msg = decode(data)
        except CoapFormatError as exc:
            if exc.type == CON and exc.mid is not None:
                self._reset(addr, exc.mid)
            return []
        return self._by_type[msg.type](msg, addr, now)

    def _on_request(self, msg: Message, addr: Address, now: float) -> list[Event]:
        con = msg.type == CON
        if msg.code == Code.EMPTY or msg.code >= 32:  # ping, or a response we never asked for
            if con:
                self._reset(addr, msg.mid)
            return []
        key = (addr, msg.mid)
        seen = self._seen.get(key)
        if seen is not None:
            reply = seen.reply if isinstance(seen, Exchange) else seen
            if con and reply:
                self._outbox.append((reply, addr))
            return []
        exchange = Exchange(addr, msg, now)
        cfg = self.config
        self._seen.put(key, exchange, now, cfg.exchange_lifetime_s if con else cfg.non_lifetime_s)
        # Every option is checked before anything changes: a refused request has no side effect (§5.4.1).
        block1: Block | None = None
        last = -1
        for number, value in msg.options:
            if number == last and number not in _REPEATABLE:
                if number & 1:
                    return self._refuse(exchange, now, Code.BAD_OPTION, "bad_option")
                continue  # a repeated elective option: only the first counts
            last = number
            if number in _PLAIN_OPTIONS:
                continue
            if number == Option.BLOCK1 or number == Option.BLOCK2:
                block = _block(value)
                if not isinstance(block, Block):
                    return self._refuse(exchange, now, *block)
                if number == Option.BLOCK1:
                    block1 = block
                else:
                    exchange.block2 = block
            elif number in _PROXY_OPTIONS:
                return self._refuse(exchange, now, Code.PROXYING_NOT_SUPPORTED, "proxying_not_supported")
            elif number & 1 and number not in KNOWN_OPTIONS:
                return self._refuse(exchange, now, Code.BAD_OPTION, "bad_option")
        if block1 is not None:
            refused = self._reassemble(exchange, block1, now)
            if refused is not None:
                return refused
        events: list[Event] = []
        if msg.code == Code.GET and exchange.observe == 1:  # compared as a uint: 0x0001 is 1 (§3.2)
            cancelled = self._observations.pop((addr, msg.token), None)
            if cancelled is not None:
                cancelled.active = False
                events.append(ObservationCancelled(cancelled, "deregistered"))
        block2 = exchange.block2
        if block2 is not None and block2.num and msg.code == Code.GET and exchange.observe is None:
            kept = self._bodies.get((addr, exchange.path, exchange.query))
            if kept is not None:  # a later block of a body sent in blocks: from that same body
                self.respond(exchange, now, *kept)
                return events
        if con:
            exchange.deadline = now + cfg.piggyback_timeout_s
            self._piggyback.append(exchange)
        events.append(request_received(exchange))
        return events

    def _refuse(self, exchange: Exchange, now: float, code: int, reason: str, options: Options = ()) -> list[Event]:
        """Answer a request the endpoint refuses itself; a NON with a bad option is only dropped (§5.4.1)."""
        if exchange.confirmable or code != Code.BAD_OPTION:
            self.respond(exchange, now, code, options=options)
        return [RequestRefused(exchange, reason)]

    def _reassemble(self, exchange: Exchange, block: Block, now: float) -> list[Event] | None:
        """Feed one Block1 block; None when the body is complete and the request goes to the application,
        else the (already answered) block's events."""
        size1 = exchange.uint_option(Option.SIZE1)
        key = (exchange.addr, tuple(o for o in exchange.options if o[0] in _URI_OPTIONS))
        result = self._blocks.feed(key, block, exchange.payload, size1, now)
        if isinstance(result, bytes):
            exchange.payload = result
            exchange.block1 = block
            return None
        if result == Code.CONTINUE:
            szx = min(block.szx, self.config.block_szx)
            self.respond(exchange, now, Code.CONTINUE, options=((Option.BLOCK1, Block(block.num, True, szx).encode()),))
            return []
        options: Options = ()
        if result == Code.REQUEST_ENTITY_TOO_LARGE:
            options = ((Option.SIZE1, encode_uint(self.config.max_body_bytes)),)
        return self._refuse(exchange, now, result, _BLOCK1_REASONS[result], options)

    def _on_ack(self, msg: Message, addr: Address, now: float) -> list[Event]:
        if msg.code != Code.EMPTY:  # a piggybacked response: we never send requests
            return []
        out = self._outgoing.pop((addr, msg.mid), None)
        if out is None:
            return []
        out.done = True
        if out.ping is not None:  # an ACK instead of the RST a ping expects: alive all the same
            out.ping.heard = now
            return []
        observation = out.observation
        if observation is None:
            return []
        observation.in_flight -= 1
        observation.heard = now
        return [NotificationAcknowledged(observation, out.mid)]

    def _on_reset(self, msg: Message, addr: Address, now: float) -> list[Event]:
        if msg.code != Code.EMPTY:
            return []
        key = (addr, msg.mid)
        out = self._outgoing.pop(key, None)
        if out is not None and out.ping is not None:  # the answer a ping asks for (RFC 7252 §4.3): alive
            out.done = True
            out.ping.heard = now
            return []
        if out is not None:
            out.done = True
            # a Reset of a separate registration response ends the observation too (RFC 7641 §3.6)
            observation = out.observation or (out.exchange.observation if out.exchange else None)
        else:
            observation = self._recent_non.pop(key)
        if observation is None or not observation.active:
            return []
        self._drop_observation(observation)
        return [ObservationCancelled(observation, "reset")]

    # ------------------------------------------------------------------ output

    def respond(self, exchange: Exchange, now: float, code: int, payload: bytes = b"", options: Options = ()) -> None:
        """Answer a request: piggybacked in the ACK if still in time, else separately (CON for a CON)."""
        if exchange.state == ANSWERED:
            raise ValueError("exchange already answered")
        if payload and (exchange.block2 is not None or len(payload) > 16 << self.config.block_szx):
            payload, options = self._block2(exchange, now, code, payload, options)
        if exchange.block1 is not None:
            block = exchange.block1
            options = (*options, (Option.BLOCK1, Block(block.num, False, block.szx).encode()))
        if exchange.observation is not None:
            options = (*options, (Option.OBSERVE, encode_uint(exchange.observation.seq)))
        addr = exchange.addr
        if exchange.confirmable and exchange.state == PENDING:
            if options or payload:
                datagram = encode(Message(ACK, code, exchange.mid, exchange.token, options, payload))
            else:  # the hot path: a bare piggybacked 2.01
                token, mid = exchange.token, exchange.mid
                datagram = bytes((0x60 | len(token), code, mid >> 8, mid & 0xFF)) + token
            exchange.reply = datagram
        elif exchange.confirmable:
            mid = self._new_mid()
            datagram = encode(Message(CON, code, mid, exchange.token, options, payload))
            self._send_confirmable(addr, mid, datagram, now).exchange = exchange
        else:
            mid = self._new_mid()
            datagram = encode(Message(NON, code, mid, exchange.token, options, payload))
            if exchange.observation is not None:  # the registration response counts as a notification (§3.6)
                self._recent_non.put((addr, mid), exchange.observation, now, self.config.non_lifetime_s)
        exchange.state = ANSWERED
        # duplicates get the piggybacked response, or the empty ACK of a separate one, or nothing (NON)
        self._seen.replace((addr, exchange.mid), exchange, exchange.reply or b"")
        self._outbox.append((datagram, addr))

    def _block2(
        self, exchange: Exchange, now: float, code: int, payload: bytes, options: Options
    ) -> tuple[bytes, Options]:
        """Slice a response into the block the client asked for, or block 0 if it is too large for one. A GET
        answer in blocks is kept, with an ETag, for the client's requests of the next blocks."""
        requested = exchange.block2
        szx = self.config.block_szx if requested is None else min(requested.szx, self.config.block_szx)
        if requested is None and len(payload) <= 16 << szx:
            return payload, options
        if exchange.code == Code.GET and len(payload) > 16 << szx:
            options = self._keep_body((exchange.addr, exchange.path, exchange.query), now, code, payload, options)
        return _slice(payload, options, 0 if requested is None else requested.num, szx)

    def _keep_body(
        self,
        key: tuple[Address, tuple[str, ...], tuple[str, ...]],
        now: float,
        code: int,
        body: bytes,
        options: Options,
    ) -> Options:
        """Remember a body sent in blocks; its ETag lets the client tell it from a newer one (RFC 7959 §2.4)."""
        if not any(number == Option.ETAG for number, _ in options):
            self._etag = (self._etag + 1) & 0xFFFFFFFF
            options = (*options, (Option.ETAG, self._etag.to_bytes(4, "big")))
        self._bodies.put(key, (code, body, options), now, self.config.block_lifetime_s)
        return options

    def observe(self, exchange: Exchange) -> Observation | None:
        """Register the requester of a GET Observe=0 as observer; its response will carry Observe.

        A registration with the same address and token replaces the old one (RFC 7641 §4.1): for the same
        resource it is the same observation again; for another one (path or query) the old observation ends
        (inactive, no message, no event: the caller asked ``observation(addr, token)`` first if it cares) and
        a new one takes its place. Returns None when ``max_observations`` is reached: the response then goes
        out without Observe, which tells the client it is not registered.
        """
        if exchange.code != Code.GET or exchange.observe != 0 or exchange.state == ANSWERED:
            raise ValueError("only an unanswered GET with Observe: 0 registers an observer")
        key = (exchange.addr, exchange.token)
        observation = self._observations.get(key)
        path, query = exchange.path, exchange.query
        renewed = observation is not None and observation.path == path and observation.query == query
        if observation is not None and not renewed:
            old, observation = observation, Observation(exchange.addr, exchange.token, path, query, False)
            old.active = False  # its CON notifications in flight are dropped, not retransmitted
            observation.seq = old.seq  # same token: the client's sequence numbers keep increasing
            self._observations[key] = observation
        elif observation is None:
            if len(self._observations) >= self.config.max_observations:
                return None
            observation = Observation(exchange.addr, exchange.token, path, query, False)
            self._observations[key] = observation
        observation.confirmable = exchange.confirmable
        observation.seq = (observation.seq + 1) & 0xFFFFFF
        observation.heard = exchange.received_at
        if not renewed:  # a new observation: its liveness checks start
            self._schedule_check(observation, exchange.received_at + self.config.observer_check_s)
        exchange.observation = observation
        return observation

    def notify(
        self,
        observation: Observation,
        now: float,
        code: int,
        payload: bytes = b"",
        options: Options = (),
        confirmable: bool | None = None,
    ) -> int | None:
        """Send a notification; returns its message id, or None when too many CON ones are unacknowledged."""
        if not observation.active:
            raise ValueError("observation was cancelled")
        con = observation.confirmable if confirmable is None else confirmable
        if con and observation.in_flight >= self.config.max_notifications_in_flight:
            return None
        observation.seq = (observation.seq + 1) & 0xFFFFFF
        mid = self._new_mid()
        if len(payload) > 16 << self.config.block_szx:  # block 0; the client GETs the rest (RFC 7959 §3.4)
            key = (observation.addr, observation.path, observation.query)
            options = self._keep_body(key, now, code, payload, options)
            payload, options = _slice(payload, options, 0, self.config.block_szx)
        options = ((Option.OBSERVE, encode_uint(observation.seq)), *options)
        datagram = encode(Message(CON if con else NON, code, mid, observation.token, options, payload))
        if con:
            self._send_confirmable(observation.addr, mid, datagram, now).observation = observation
            observation.in_flight += 1
        else:
            self._recent_non.put((observation.addr, mid), observation, now, self.config.non_lifetime_s)
        self._outbox.append((datagram, observation.addr))
        return mid

    def cancel_observation(self, observation: Observation) -> None:
        """Forget an observer (e.g. replaced by a newer registration); no message is sent."""
        if observation.active:
            self._drop_observation(observation)

    def observation(self, addr: Address, token: bytes) -> Observation | None:
        """The observation registered with this address and token, if any."""
        return self._observations.get((addr, token))

    def observations(self) -> Iterable[Observation]:
        return self._observations.values()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next run (same clock as ``now``), or None if nothing is scheduled."""
        piggyback = self._piggyback
        if _drop_front is not None:  # the loop below in C: it runs once per request answered
            _drop_front(piggyback, "state", PENDING)
        while piggyback and piggyback[0].state != PENDING:
            piggyback.popleft()
        heap = self._retransmit
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        when: float | None = None
        if piggyback:
            when = piggyback[0].deadline
        if heap and (when is None or heap[0][0] < when):
            when = heap[0][0]
        if (self._seen or self._blocks or self._recent_non or self._bodies) and (when is None or self._sweep_at < when):
            when = self._sweep_at
        checks = self._checks
        while checks and not checks[0][2].active:
            heapq.heappop(checks)
        if checks and (when is None or checks[0][0] < when):
            when = checks[0][0]
        return when

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        piggyback = self._piggyback
        while piggyback:
            exchange = piggyback[0]
            if exchange.state == PENDING:
                if exchange.deadline > now:
                    break
                exchange.reply = encode(Message(ACK, Code.EMPTY, exchange.mid))
                exchange.state = SEPARATE
                self._outbox.append((exchange.reply, exchange.addr))
            piggyback.popleft()
        heap = self._retransmit
        while heap and heap[0][0] <= now:
            _, _, out = heapq.heappop(heap)
            if not out.done:
                self._retransmit_or_give_up(out, now, events)
        self._check_observers(now)
        if now >= self._sweep_at:
            self._sweep(now)
        return events

    def _check_observers(self, now: float) -> None:
        """Ping each observer due for a check (not heard from for ``observer_check_s``, nothing in flight)."""
        checks, every = self._checks, self.config.observer_check_s
        while checks and checks[0][0] <= now:
            _, _, observation = heapq.heappop(checks)
            if not observation.active:
                continue
            if observation.heard + every > now:  # heard from since this check was scheduled
                self._schedule_check(observation, observation.heard + every)
                continue
            if not observation.in_flight:  # else a CON notification in flight tells by itself
                observation.heard = now  # the ping's own timeout decides from here
                datagram = encode(Message(CON, Code.EMPTY, mid := self._new_mid()))
                self._send_confirmable(observation.addr, mid, datagram, now).ping = observation
                self._outbox.append((datagram, observation.addr))
            self._schedule_check(observation, now + every)

    def _schedule_check(self, observation: Observation, due: float) -> None:
        checks = self._checks
        if len(checks) > 2 * len(self._observations) + 1024:  # ended observations' entries: drop them
            checks[:] = [entry for entry in checks if entry[2].active]
            heapq.heapify(checks)
        self._check_n += 1
        heapq.heappush(checks, (due, self._check_n, observation))

    def _retransmit_or_give_up(self, out: _Outgoing, now: float, events: list[Event]) -> None:
        observation = out.observation or out.ping
        if observation is not None and not observation.active:
            out.done = True
            self._outgoing.pop((out.addr, out.mid), None)
            return
        if out.attempts < self.config.max_retransmit:
            out.attempts += 1
            out.timeout *= 2
            heapq.heappush(self._retransmit, (now + out.timeout, id(out), out))
            self._outbox.append((out.datagram, out.addr))
            return
        out.done = True
        self._outgoing.pop((out.addr, out.mid), None)
        if out.ping is not None:  # the observer is gone without a word
            self._drop_observation(out.ping)
            events.append(ObservationCancelled(out.ping, "timeout"))
            return
        if observation is not None:
            observation.in_flight -= 1
            self._drop_observation(observation)
            events.append(NotificationTimedOut(observation, out.mid))
            events.append(ObservationCancelled(observation, "timeout"))
        elif out.exchange is not None:
            events.append(ResponseTimedOut(out.exchange))

    def _sweep(self, now: float) -> None:
        self._seen.expire(now)
        self._recent_non.expire(now)
        self._blocks.expire(now)
        self._bodies.expire(now)
        self._sweep_at = now + self.config.housekeeping_s

    # ------------------------------------------------------------------ helpers

    def _send_confirmable(self, addr: Address, mid: int, datagram: bytes, now: float) -> _Outgoing:
        cfg = self.config
        timeout = cfg.ack_timeout_s * (1 + (cfg.ack_random_factor - 1) * self._rng())
        out = _Outgoing(addr, mid, datagram, timeout)
        self._outgoing[(addr, mid)] = out
        heapq.heappush(self._retransmit, (now + timeout, id(out), out))
        return out

    def _drop_observation(self, observation: Observation) -> None:
        observation.active = False
        key = (observation.addr, observation.token)
        if self._observations.get(key) is observation:
            del self._observations[key]

    def _reset(self, addr: Address, mid: int) -> None:
        self._outbox.append((encode(Message(RST, Code.EMPTY, mid)), addr))

    def _new_mid(self) -> int:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        return mid

    def stats(self) -> dict[str, int]:
        """Sizes of every table that grows with traffic (for tests and /health)."""
        return {
            "exchanges": len(self._seen),
            "piggyback_pending": len(self._piggyback),
            "outgoing": len(self._outgoing),
            "retransmit_queue": len(self._retransmit),
            "observations": len(self._observations),
            "recent_notifications": len(self._recent_non),
            "block_transfers": len(self._blocks),
            "kept_bodies": len(self._bodies),
        }


def _slice(payload: bytes, options: Options, num: int, szx: int) -> tuple[bytes, Options]:
    """Block ``num`` of a body, with its Block2 option (and Size2 on the first)."""
    size = 1 << (szx + 4)
    start = num * size
    extra = [(Option.BLOCK2, Block(num, start + size < len(payload), szx).encode())]
    if num == 0:
        extra.append((Option.SIZE2, encode_uint(len(payload))))
    return payload[start : start + size], (*options, *extra)


def _block(value: bytes) -> Block | tuple[int, str]:
    """A Block1/Block2 value, or the refusal: over 3 bytes it is unrecognized (RFC 7252 §5.4.3, critical),
    SZX 7 is 4.00 (RFC 7959 §2.2)."""
    if len(value) > 3:
        return Code.BAD_OPTION, "bad_option"
    try:
        return Block.decode(value)
    except ValueError:
        return Code.BAD_REQUEST, "bad_request"
