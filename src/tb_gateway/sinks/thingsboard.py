"""Forward batches to a ThingsBoard server's HTTP device API (the seed's fallback when Kafka is off).

Each device of a batch costs one request per record kind: its telemetry as one JSON array of
``{"ts", "values"}`` objects (ThingsBoard keeps each element's own ts), its attributes merged into one object
(later values win, as they would have on the server) and one request per claim. Devices are sent
concurrently, a device's own requests one after the other. docs/thingsboard-backend.md has the whole story.

Answers: 2xx delivered; 401 (token no longer valid) and any other 4xx except 408/429 are permanent for that
device's records -> ``Outcome.REJECTED``; a 401 also calls ``on_token_rejected`` so the credential cache can
forget the token. No answer, 408, 429 and 5xx are retried with capped exponential backoff. A device whose
request still fails gets ``SINK_FAILED`` for the rest of its records (the spool wrapper keeps exactly those);
when no device got through at all, the whole batch raises ``RetriableSinkError``. A request that timed out
may still have been stored by ThingsBoard: sending it again is a duplicate, never a loss.

The HTTP client (aiohttp, keep-alive, at most ``max_connections``) and why it is aiohttp: ``tb_client.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from tb_gateway.config import Settings
from tb_gateway.errors import RetriableSinkError
from tb_gateway.metrics import Metrics
from tb_gateway.records import Record, RecordKind
from tb_gateway.sinks.base import Outcome
from tb_gateway.tb_client import Answer, call, device_url, open_session

log = logging.getLogger(__name__)

_RETRIABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """One POST for one device: where it goes, its JSON body and the batch positions of its records."""

    token: str
    device: str  # for logs: the device name, never its token
    endpoint: str
    body: Any
    indexes: tuple[int, ...]


def _telemetry(records: Sequence[Record], indexes: Sequence[int]) -> list[DeviceRequest]:
    body = [{"ts": r.ts, "values": r.values} for r in records]
    return [_request(records[0], "telemetry", body, indexes)]


def _attributes(records: Sequence[Record], indexes: Sequence[int]) -> list[DeviceRequest]:
    merged: dict[str, Any] = {}
    for r in records:
        merged.update(r.values)
    return [_request(records[0], "attributes", merged, indexes)]


def _claims(records: Sequence[Record], indexes: Sequence[int]) -> list[DeviceRequest]:
    return [_request(r, "claim", r.values, [i]) for r, i in zip(records, indexes, strict=True)]


def _request(first: Record, endpoint: str, body: Any, indexes: Sequence[int]) -> DeviceRequest:
    return DeviceRequest(first.device.token, first.device.name, endpoint, body, tuple(indexes))


_BUILDERS: dict[RecordKind, Callable[[Sequence[Record], Sequence[int]], list[DeviceRequest]]] = {
    RecordKind.TELEMETRY: _telemetry,
    RecordKind.ATTRIBUTES: _attributes,
    RecordKind.CLAIM: _claims,
}


def plan_requests(batch: Sequence[Record]) -> list[list[DeviceRequest]]:
    """Group a batch into each device's requests, devices and kinds in order of first appearance."""
    per_device: dict[str, dict[RecordKind, list[int]]] = {}
    for index, record in enumerate(batch):
        per_device.setdefault(record.device.token, {}).setdefault(record.kind, []).append(index)
    return [
        [
            request
            for kind, indexes in kinds.items()
            for request in _BUILDERS[kind]([batch[i] for i in indexes], indexes)
        ]
        for kinds in per_device.values()
    ]


class _BackendUnavailable(Exception):
    """A request still failed after every retry; its records go back to the caller (the spool)."""


class ThingsBoardSink:
    """Sink into ``POST {base_url}/api/v1/{token}/{telemetry|attributes|claim}``.

    ``max_in_flight`` is 1: a device's records then reach ThingsBoard in the order they were admitted even
    across batches; the parallelism is across the devices of one batch (up to ``max_connections``).
    """

    name = "thingsboard"
    max_in_flight = 1

    def __init__(
        self,
        base_url: str,
        metrics: Metrics,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 2000,
        max_connections: int = 32,
        on_token_rejected: Callable[[str], object] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url
        self.on_token_rejected = on_token_rejected  # on a 401: app.py makes the AuthService forget the token
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_ms / 1000
        self._backoff_max_s = retry_backoff_max_ms / 1000
        self._max_connections = max_connections
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(max_connections)
        self._consecutive_failures = 0  # whole batches in a row that no device got through
        self._partial = False  # the last batch got through for some devices only
        self._last_error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, on_token_rejected: Callable[[str], object] | None = None
    ) -> ThingsBoardSink:
        return cls(
            settings.tb_base_url,
            metrics,
            timeout_s=settings.tb_http_timeout_seconds,
            max_retries=settings.tb_http_max_retries,
            retry_backoff_ms=settings.tb_http_retry_backoff_ms,
            retry_backoff_max_ms=settings.tb_http_retry_backoff_max_ms,
            max_connections=settings.tb_http_max_connections,
            on_token_rejected=on_token_rejected,
        )

    async def start(self) -> None:
        """Open the connection pool; no probe, so the gateway starts (and spools) with the backend down."""
        if self._session is None:
            self._session = open_session(self._timeout_s, self._max_connections)

    async def run(self) -> None:
        """Nothing in the background: retries happen inside ``deliver``, spooling in the wrapper."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> dict[str, Any]:
        """Down while whole batches fail (the spool wrapper then spools new batches without trying)."""
        status = "down" if self._consecutive_failures else "degraded" if self._partial else "up"
        return {
            "status": status,
            "backend": self.base_url,
            "consecutive_failures": self._consecutive_failures,
            "last_error": self._last_error,
        }

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        """Every record DELIVERED, REJECTED or, for a device whose request kept failing, SINK_FAILED.

        SINK_FAILED marks that device's records from the failed request on (its later requests are not
        tried, so nothing of it overtakes what will be retried); the spool wrapper keeps exactly those. When
        no device got through at all the backend is down: ``RetriableSinkError`` for the whole batch.
        """
        await self.start()
        outcomes = [Outcome.SINK_FAILED] * len(batch)
        problems: list[str] = []
        async with asyncio.TaskGroup() as group:
            for requests in plan_requests(batch):
                group.create_task(self._send_device(requests, outcomes, problems))
        if problems:
            self._last_error = problems[0]
            if all(outcome is Outcome.SINK_FAILED for outcome in outcomes):
                self._consecutive_failures += 1
                raise RetriableSinkError(f"ThingsBoard at {self.base_url}: {problems[0]}")
            log.warning(
                "ThingsBoard took part of a batch; %d device requests kept failing, first: %s",
                len(problems),
                problems[0],
            )
        self._consecutive_failures = 0
        self._partial = bool(problems)
        return outcomes

    async def _send_device(
        self, requests: Sequence[DeviceRequest], outcomes: list[Outcome], problems: list[str]
    ) -> None:
        for request in requests:
            try:
                outcome = await self._send(request)
            except _BackendUnavailable as exc:
                problems.append(str(exc))
                return
            for index in request.indexes:
                outcomes[index] = outcome

    async def _send(self, request: DeviceRequest) -> Outcome:
        if not request.token:
            log.warning("device %s has no access token to forward with; records rejected", request.device)
            return Outcome.REJECTED
        url = device_url(self.base_url, request.token, request.endpoint)
        try:
            content = orjson.dumps(request.body)
        except orjson.JSONEncodeError as exc:  # normalize.py only makes JSON values; defensive all the same
            log.warning("records of device %s cannot be encoded (%s); rejected", request.device, exc)
            return Outcome.REJECTED
        problem = ""
        retry_after_s = 0.0
        for attempt in range(self._max_retries + 1):
            if attempt:
                await self._sleep(self._delay_s(attempt, retry_after_s))
            answer = await self._post(url, content, request.endpoint)
            if isinstance(answer, str):
                problem, retry_after_s = answer, 0.0
                continue
            status = answer.status
            if 200 <= status < 300:
                return Outcome.DELIVERED
            if 400 <= status < 500 and status not in _RETRIABLE_4XX:
                return self._rejected(request, answer)
            problem, retry_after_s = f"HTTP {status}", _retry_after_s(answer.retry_after)
        raise _BackendUnavailable(f"{request.endpoint} for {request.device}: {problem}")

    async def _post(self, url: URL, content: bytes, endpoint: str) -> Answer | str:
        """The answer, or what went wrong when none came (refused, reset, timed out)."""
        assert self._session is not None
        async with self._slots:  # the slot wait is not part of the request's timeout
            answer = await call(self._session, "POST", url, content)
        result = "error" if isinstance(answer, str) else str(answer.status)
        self._metrics.thingsboard_requests.labels(endpoint=endpoint, result=result).inc()
        return answer

    def _rejected(self, request: DeviceRequest, response: Answer) -> Outcome:
        log.warning(
            "ThingsBoard refused %s of device %s (%d records): HTTP %d %s",
            request.endpoint,
            request.device,
            len(request.indexes),
            response.status,
            response.body[:200].decode(errors="replace"),
        )
        if response.status == 401 and self.on_token_rejected is not None:
            self.on_token_rejected(request.token)
        return Outcome.REJECTED

    def _delay_s(self, attempt: int, retry_after_s: float) -> float:
        """Exponential backoff with jitter (half fixed, half random), capped; a backend's Retry-After wins."""
        delay = min(self._backoff_max_s, self._backoff_s * 2.0 ** (attempt - 1))
        delay = delay / 2 + self._rng.uniform(0, delay / 2)
        return max(delay, min(retry_after_s, self._backoff_max_s))


def _retry_after_s(value: str | None) -> float:
    """Retry-After in seconds (only the delta-seconds form; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value or 0))
    except ValueError:
        return 0.0
