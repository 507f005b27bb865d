"""Types of the optional C fast path (_speedups.c); a None result means "ask the Python code"."""

from typing import Any

SOURCES_SHA1: str  # setup.py's hash of the C sources this module was built from

def values(raw: Any, type_cast: bool, max_string_length: int) -> dict[str, Any] | None: ...
def telemetry(
    document: Any, now_ms: int, type_cast: bool, max_string_length: int
) -> list[tuple[int, dict[str, Any]]] | None: ...
def frame(
    payloads: list[bytes], index: int, offset: int, seq: int, crc: int, room: int
) -> tuple[bytes, int, int, int, int]: ...
def coap_decode(data: bytes) -> tuple[int, int, int, bytes, tuple[tuple[int, bytes], ...], bytes] | None: ...
def recv_datagrams(fd: int) -> list[tuple[bytes, Any]]: ...
def send_datagrams(fd: int, datagrams: list[tuple[bytes, Any]], start: int) -> int: ...
def append_durably(lock_fd: int, fd: int, data: bytes, offset: int) -> bool: ...
def http_post(data: bytes, max_head: int) -> tuple[bytes, bytes] | None: ...
def long_fraction(payload: bytes) -> bool: ...
def entry(head: bytes, ts: int, values: bytes, tail: bytes, received_at: int) -> bytes | None: ...
def mqtt_publishes(
    buf: bytes, pos: int, topics: dict[bytes, str], v5: bool, limit: int, publish: Any
) -> tuple[list[Any], int]: ...
def store_lines(records: list[Any], templates: dict[Any, Any], dumps: Any, encode: Any) -> list[bytes]: ...
def maker(cls: type[Any], fields: tuple[str, ...], defaults: tuple[Any, ...]) -> Any: ...
def sent_by_transport(records: list[Any], skip_kind: Any) -> dict[Any, int]: ...
def acks_delivered(acks: Any, delivered: Any) -> tuple[list[int], float]: ...
def settle_delivered(tickets: list[Any]) -> list[Any]: ...
def run_settled(waiting: list[Any], report: Any) -> None: ...
def observe(child: Any, seconds: float) -> None: ...
def now_ms() -> int: ...
def drop_front(queue: Any, name: str, value: Any, /) -> None: ...

class Poller:
    """poll(): ``drain()`` when ``finished`` is not empty (sinks/store.py)."""

    def __init__(self, finished: Any, drain: Any) -> None: ...
    def __call__(self) -> None: ...

class Ingest:
    """DeviceApi.post for the common telemetry message (_lanes.c); the rest goes to ``fallback``."""

    def __init__(
        self,
        api: Any,
        fallback: Any,
        admit: Any,
        received: dict[Any, Any],
        clock: Any,
        make_record: Any,
        telemetry: Any,
        loads: Any,
        ticket_type: type[Any],
        delivered: Any,
        type_cast: bool,
        max_string_length: int,
        /,
    ) -> None: ...
    def __call__(
        self,
        device: Any,
        kind: Any,
        payload: bytes,
        transport: Any,
        now_ms: int | None = None,
        *,
        activity_seen: bool = False,
    ) -> Any: ...

class HttpLane:
    """What the HTTP fast lane shares across a server's connections (_lanes.c, http/server.py)."""

    taken: int  # requests the fast lane took
    def __init__(
        self,
        server: Any,
        api: Any,
        http: Any,
        keep: Any,
        outcome_type: type[Any],
        delivered: Any,
        ticket_type: type[Any],
        when_settled: Any,
        responses: Any,
        ack_latency: Any,
        max_head: int,
        max_routes: int,
        /,
    ) -> None: ...

class FastConnection:
    """The C base of HttpConnection: the fast lane and the state it reads (_lanes.c)."""

    lane: Any
    loop: Any
    transport: Any
    queue: Any
    current: Any
    fast: Any
    address: Any
    deadline: float
    timer: int
    busy: bool
    paused: bool
    write_paused: bool
    stopped: bool
    closing: bool
    def data_received(self, data: bytes) -> None: ...
    def _fast_settled(self, future: Any) -> None: ...

class MqttLane:
    """What the MQTT lane shares across a server's connections (_mqtt_lane.c, mqtt/server.py)."""

    taken: int  # reads the lane took
    def __init__(
        self,
        api: Any,
        mqtt: Any,
        topics: dict[bytes, Any],
        outcome_type: type[Any],
        delivered: Any,
        ticket_type: type[Any],
        when_settled: Any,
        connected: Any,
        latency: Any,
        payload_error: Any,
        max_packet: int,
        headroom: int,
        max_inflight: int,
        sample: int,
        /,
    ) -> None: ...
    def publishes(self, data: bytes, v5: bool, /) -> int: ...

class FastMqttConnection:
    """The C base of MqttConnection: the MQTT lane and the state it reads (_mqtt_lane.c)."""

    _lane: Any
    _server: Any
    _api: Any
    _loop: Any
    _transport: Any
    _session: Any
    _acks: Any
    _device: Any
    _codes: Any
    _watching: Any
    _backlog: Any
    _downlink: Any
    _drained: Any
    _read_at: float
    _read_ms: int
    _paused: int
    _sampled: int
    _closing: bool
    _v5: bool
    def data_received(self, data: bytes) -> None: ...
    def _settled(self, future: Any) -> None: ...

class CoapLane:
    """The CoAP server's common request in C (_lanes.c, coap/server.py)."""

    def __init__(
        self,
        server: Any,
        endpoint: Any,
        api: Any,
        make_exchange: Any,
        request_received: Any,
        pending: int,
        answered: int,
        coap: Any,
        delivered: Any,
        ticket_type: type[Any],
        when_settled: Any,
        max_routes: int,
        /,
    ) -> None: ...
    def receive(self, datagrams: list[tuple[bytes, Any]], now: float) -> None: ...

# _kafka_lane.c (sinks/kafka.py)
def kafka_encode(record: Any, /) -> tuple[bytes, bytes, list[tuple[str, bytes]]] | None: ...
def kafka_produce(
    produce: Any, records: list[Any], topics: list[str], batch: KafkaBatch, encode: Any, refusals: Any, /
) -> list[tuple[int, BaseException]]: ...

class KafkaBatch:
    """One KafkaSink.deliver call: outcomes settled by delivery reports; the last resolves ``future``."""

    future: Any
    outcomes: list[Any]
    remaining: int
    started: float

    def __init__(
        self, loop: Any, resolve: Any, future: Any, outcomes: list[Any], delivered: Any, latency: Any, on_error: Any, /
    ) -> None: ...
    def settle(self, index: int, outcome: Any, /) -> None: ...

class SeenTable:
    """coap/expiring.py's PeerWindowedMap for (peer, 16-bit message id) keys, in C (_seen.c)."""

    cap: int
    window: int
    def __init__(self, cap: int, window: int) -> None: ...
    def get(self, key: tuple[Any, int], /) -> Any: ...
    def put(self, key: tuple[Any, int], value: Any, now: float, lifetime: float, /) -> None: ...
    def replace(self, key: tuple[Any, int], old: Any, new: Any, /) -> None: ...
    def pop(self, key: tuple[Any, int], /) -> Any: ...
    def expire(self, now: float, /) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def entries(self) -> list[tuple[tuple[Any, int], float, Any]]: ...
    def __len__(self) -> int: ...
