"""In-process building blocks for tests: a recording sink and a DeviceApi wired like the app wires it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tb_gateway.attributes import AttributeStore
from tb_gateway.auth import AccessToken, AuthService, Credentials
from tb_gateway.clock import now_ms
from tb_gateway.config import Settings
from tb_gateway.device_api import DeviceApi
from tb_gateway.errors import RetriableSinkError
from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import Pipeline
from tb_gateway.records import DeviceIdentity, Record
from tb_gateway.sinks.base import Outcome


class MemorySink:
    """Keeps every delivered batch; can be slowed, gated, or told to fail."""

    name = "memory"

    def __init__(self, max_in_flight: int = 1, delay_s: float = 0.0) -> None:
        self.max_in_flight = max_in_flight
        self.delay_s = delay_s
        self.batches: list[list[Record]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.outcome_for: dict[str, Outcome] = {}  # device name -> outcome to report instead of DELIVERED
        self.closed = False

    @property
    def records(self) -> list[Record]:
        return [record for batch in self.batches for record in batch]

    async def start(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(list(batch))
        return [self.outcome_for.get(r.device.name, Outcome.DELIVERED) for r in batch]

    async def close(self) -> None:
        self.closed = True

    def health(self) -> dict[str, Any]:
        return {"status": "up"}


class CallbackMemorySink(MemorySink):
    """A MemorySink that also offers ``deliver_then`` (sinks.base.CallbackSink), which the pipeline prefers.

    ``raise_at_once`` makes ``deliver_then`` itself raise, as a sink whose delivery cannot even start would.
    """

    def __init__(self, max_in_flight: int = 1, delay_s: float = 0.0) -> None:
        super().__init__(max_in_flight, delay_s)
        self.raise_at_once: Exception | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def deliver_then(self, batch: Sequence[Record], done: Callable[[Any], None]) -> None:
        if self.raise_at_once is not None:
            raise self.raise_at_once

        async def deliver() -> None:
            try:
                answer: Any = await self.deliver(batch)
            except Exception as exc:
                answer = exc
            done(answer)

        task = asyncio.get_running_loop().create_task(deliver())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def poll(self) -> None:
        """Nothing to hurry: each answer comes from its own task."""


class PollOnlySink(CallbackMemorySink):
    """Answers only when polled: shows that a transport settles finished deliveries at its reads (the real
    store also schedules the answer itself, which is what would hide a transport that forgot to poll)."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[tuple[Callable[[Any], None], list[Outcome]]] = []

    def deliver_then(self, batch: Sequence[Record], done: Callable[[Any], None]) -> None:
        self.batches.append(list(batch))
        self.finished.append((done, [Outcome.DELIVERED] * len(batch)))

    def poll(self) -> None:
        while self.finished:
            done, outcomes = self.finished.pop(0)
            done(outcomes)


class TokenSource:
    """A credential source from a dict of token -> device name."""

    name = "test"

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens
        self.lookups = 0

    async def lookup(self, credentials: Credentials) -> DeviceIdentity | None:
        self.lookups += 1
        if isinstance(credentials, AccessToken) and credentials.token in self.tokens:
            name = self.tokens[credentials.token]
            return DeviceIdentity(f"id-{name}", name, "default", credentials.token)
        return None


def make_api(
    tmp_path: Path,
    sink: MemorySink | None = None,
    tokens: dict[str, str] | None = None,
    clock_ms: Callable[[], int] = now_ms,
    **settings: Any,
) -> DeviceApi:
    """A DeviceApi over a MemorySink; call inside a running loop and run ``api.pipeline.run()`` beside it."""
    config = Settings(_env_file=None, kafka_enabled=False, data_dir=tmp_path, **settings)  # type: ignore[call-arg]
    metrics = Metrics()
    pipeline = Pipeline(
        sink or MemorySink(),
        metrics,
        batch_size=config.batch_size,
        batch_timeout_s=config.batch_timeout,
        max_queue=config.queue_max_records,
    )
    auth = AuthService(
        [TokenSource(tokens or {"T1": "dev1"})],
        metrics,
        ttl_s=config.auth_cache_ttl_seconds,
        negative_ttl_s=config.auth_negative_cache_ttl_seconds,
    )
    return DeviceApi(config, auth, pipeline, AttributeStore(tmp_path / "attributes.db"), metrics, clock_ms=clock_ms)


__all__ = ["MemorySink", "RetriableSinkError", "TokenSource", "make_api"]
