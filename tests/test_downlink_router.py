"""The cross-process router (downlink/router.py) with an in-memory directory and bus and an explicit clock:
several hubs stand for several workers or instances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tb_gateway.attributes import AttributeStore
from tb_gateway.downlink.hub import Downlink
from tb_gateway.downlink.router import TICKET_GRACE_MS, Router
from tb_gateway.downlink.rpc import RpcStatus
from tb_gateway.downlink.sessions import Feature
from tb_gateway.downlink.shared_attributes import parse_change
from tb_gateway.metrics import Metrics
from tb_gateway.records import RecordKind, Transport
from tests.downlink_support import DEVICE, OTHER, Clock, FakePipeline, FakeSession


@dataclass
class FakeRedis:
    """What the processes share: the directory, liveness, and the channels."""

    up: bool = True
    holders: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, set[str]] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    routers: dict[str, Router] = field(default_factory=dict)
    published: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


class FakeDirectory:
    def __init__(self, shared: FakeRedis) -> None:
        self.shared = shared

    @property
    def up(self) -> bool:
        return self.shared.up

    def failed(self, exc: BaseException) -> None:
        self.shared.failures.append(exc)
        self.shared.up = False  # as RedisCache: down until its subscriber reaches Redis again

    def _check(self) -> None:
        if not self.shared.up:
            raise ConnectionError("redis is down")

    async def hold(self, device_id: str, worker: str) -> list[str]:
        self._check()
        self.shared.holders[device_id] = worker
        return sorted(self.shared.waiting.pop(device_id, set()))

    async def release(self, device_id: str, worker: str) -> None:
        self._check()
        if self.shared.holders.get(device_id) == worker:
            del self.shared.holders[device_id]

    async def holder_or_wait(self, device_id: str, worker: str, ttl_ms: int) -> str | None:
        self._check()
        assert ttl_ms > 0
        self.shared.waiting.setdefault(device_id, set()).add(worker)
        holder = self.shared.holders.get(device_id)
        if holder is not None and holder != worker and holder not in self.shared.alive:
            return None
        return holder

    async def heartbeat(self, worker: str, ttl_ms: int) -> None:
        self._check()
        self.shared.alive.add(worker)

    async def gone(self, worker: str) -> None:
        self.shared.alive.discard(worker)

    async def broadcast(self, message: bytes) -> None:
        self._check()
        for router in list(self.shared.routers.values()):
            router.on_shared(message)

    async def publish(self, worker: str, message: bytes) -> None:
        self._check()
        self.shared.published.append((worker, orjson.loads(message)))
        router = self.shared.routers.get(worker)
        if router is not None:
            router.on_message(message)


@dataclass
class Worker:
    hub: Downlink
    router: Router
    pipeline: FakePipeline
    store: AttributeStore

    def outcomes(self) -> list[tuple[int, str]]:
        return [(v["id"], v["status"]) for v in self.pipeline.of(RecordKind.RPC_RESPONSE)]

    def connect(self, session: FakeSession) -> FakeSession:
        self.hub.attach(session)
        self.hub.subscribe(session, Feature.RPC)
        return session


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, clock: Clock, *names: str) -> AsyncIterator[tuple[FakeRedis, list[Worker]]]:
    """One process per name; ``instance/worker`` names put workers in one instance."""
    shared = FakeRedis()
    workers = []
    for name in names:
        pipeline = FakePipeline()
        instance, _, worker = name.partition("/")
        store = AttributeStore(tmp_path / f"{instance}{worker}.db")
        hub = Downlink(store, Metrics(), submit=pipeline.submit, session_limits=dict, instance=name, clock_ms=clock)
        router = Router(hub, FakeDirectory(shared), clock, instance)
        shared.routers[name] = router
        workers.append(Worker(hub, router, pipeline, store))
    tasks = [asyncio.create_task(w.router.run()) for w in workers]
    await settle()
    try:
        yield shared, workers
    finally:
        for w in workers:
            w.hub.close()
            await w.router.aclose()
            w.store.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_rpc_read_by_one_process_is_delivered_and_reported_by_the_holder(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, b)):
            session = b.connect(FakeSession())
            await settle()
            assert shared.holders == {DEVICE.id: "b"} and shared.alive == {"a", "b"}
            b.hub.send_rpc(DEVICE.id, "warmup", None, timeout_ms=5000)  # b's own request for the device: id 1
            b.hub.rpc_replied(DEVICE.id, 1, b"{}")

            _request, answer = a.hub.send_rpc(DEVICE.id, "setValve", {"open": True}, timeout_ms=5000, request_id="r-9")
            await settle()
            assert [c.method for c in session.rpcs] == ["warmup", "setValve"]
            assert session.rpcs[1].id == 2  # the holder's next id for the device, never a clash with its own
            assert b.hub.rpc_replied(DEVICE.id, 2, b'{"ok":true}')
            await settle()
            outcome = await asyncio.wait_for(answer, 1)  # a caller waiting at the reader hears the holder's end
            assert (outcome.status, outcome.request.id, outcome.response) == (RpcStatus.REPLIED, 2, {"ok": True})
            assert outcome.request.request_id == "r-9" and outcome.transport is Transport.MQTT
            assert a.outcomes() == []  # the reader reports nothing: one report per step, by the holder
            assert b.outcomes() == [(1, "delivered"), (1, "replied"), (2, "delivered"), (2, "replied")]
            rpc_records = [r for r in b.pipeline.records if r.kind is RecordKind.RPC_RESPONSE]
            assert rpc_records[-1].values["requestId"] == "r-9" and rpc_records[-1].device.name == DEVICE.name

    asyncio.run(scenario())


def test_rpc_for_a_device_connected_nowhere_waits_and_follows_it_when_it_connects(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b", "c") as (shared, (a, b, c)):
            _, answer = a.hub.send_rpc(DEVICE.id, "reboot", None, oneway=True, timeout_ms=30_000)
            _, other = a.hub.send_rpc(OTHER.id, "ping", None, timeout_ms=1_000)
            await settle()
            assert shared.waiting == {DEVICE.id: {"a"}, OTHER.id: {"a"}}
            assert a.hub.rpc.pending == 2

            clock.advance(10_000)
            session = c.connect(FakeSession())  # the device turns up at c, ten seconds later
            await settle()
            assert [(call.id, call.method) for call in session.rpcs] == [(1, "reboot")]
            c.hub.rpc_delivered(DEVICE.id, 1)
            await settle()
            assert (await asyncio.wait_for(answer, 1)).status is RpcStatus.DELIVERED
            assert (a.outcomes(), b.outcomes(), c.outcomes()) == ([], [], [(1, "delivered")])
            assert DEVICE.id not in shared.waiting and a.hub.rpc.pending == 1

            a.hub.tick()  # the other device never comes: expired once, where it waited
            assert a.outcomes() == [(1, "expired")] and (await other).status is RpcStatus.EXPIRED
            assert b.outcomes() == [] and c.outcomes() == [(1, "delivered")]

    asyncio.run(scenario())


def test_waiting_request_is_found_by_the_recheck_when_the_notice_was_lost(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, b)):
            a.hub.send_rpc(DEVICE.id, "reboot", None, timeout_ms=30_000)
            await settle()
            del shared.routers["a"]  # a hears nothing: b's "the device is here" notice is lost
            session = b.connect(FakeSession())
            await settle()
            assert session.rpcs == [] and shared.published[-1] == (
                "a",
                {"t": "attached", "device": DEVICE.id, "holder": "b"},
            )
            shared.routers["a"] = a.router
            a.router.resync()  # what the periodic re-check (and a Redis reconnection) does
            await settle()
            assert [call.method for call in session.rpcs] == ["reboot"]
            assert a.hub.rpc.pending == 0 and b.hub.rpc.pending == 1

    asyncio.run(scenario())


def test_device_moving_between_processes_and_a_stale_release(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, b)):
            on_a = a.connect(FakeSession())
            await settle()
            on_b = b.connect(FakeSession())  # the device moved: b writes the directory first
            await settle()
            assert shared.holders == {DEVICE.id: "b"}
            a.hub.detach(on_a)  # a's session is closed after: its release must not erase b's entry
            await settle()
            assert shared.holders == {DEVICE.id: "b"}
            a.hub.send_rpc(DEVICE.id, "where", None, timeout_ms=5000)
            await settle()
            assert [call.method for call in on_b.rpcs] == ["where"] and on_a.rpcs == []
            b.hub.detach(on_b)
            await settle()
            assert shared.holders == {}

    asyncio.run(scenario())


def test_dead_holder_is_ignored_and_requests_wait(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, _b)):
            shared.holders[DEVICE.id] = "crashed"  # a process that died holding the device; no alive key
            a.hub.send_rpc(DEVICE.id, "reboot", None, timeout_ms=5000)
            await settle()
            assert a.hub.rpc.pending == 1 and all(worker != "crashed" for worker, _ in shared.published)
            assert shared.waiting == {DEVICE.id: {"a"}}

    asyncio.run(scenario())


def test_redis_down_requests_stay_where_read_and_local_delivery_works(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, b)):
            b.connect(FakeSession())
            await settle()
            shared.up = False
            local = a.connect(FakeSession(device=OTHER))
            a.hub.send_rpc(OTHER.id, "here", None, timeout_ms=5000)
            a.hub.send_rpc(DEVICE.id, "there", None, timeout_ms=5000)
            await settle()
            assert [call.method for call in local.rpcs] == ["here"]  # held here: delivered as always
            assert a.hub.rpc.pending == 2 and b.hub.rpc.pending == 0  # not handed over while Redis is down
            clock.advance(5000)
            a.hub.tick()
            assert sorted(a.outcomes()) == [(1, "expired"), (1, "timeout")]  # one per device: nothing lost

    asyncio.run(scenario())


def test_publish_failure_gives_the_request_back_and_an_unanswered_caller_times_out(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (shared, (a, b)):
            b.connect(FakeSession())
            await settle()
            del shared.routers["b"]  # b died without a trace: what a sends it is lost
            _, answer = a.hub.send_rpc(DEVICE.id, "reboot", None, timeout_ms=5000)
            await settle()
            assert a.hub.rpc.pending == 0 and not answer.done()
            clock.advance(5000 + TICKET_GRACE_MS)
            a.router._sweep_tickets()
            outcome = await asyncio.wait_for(answer, 1)
            assert outcome.status is RpcStatus.TIMEOUT and a.outcomes() == []

            # a publish that fails puts the request back where it was read
            directory = a.router._dir
            assert isinstance(directory, FakeDirectory)

            async def broken(worker: str, message: bytes) -> None:
                raise ConnectionError("lost")

            directory.publish = broken  # type: ignore[method-assign]
            a.hub.send_rpc(DEVICE.id, "again", None, timeout_ms=5000)
            await settle()
            assert a.hub.rpc.pending == 1 and len(shared.failures) == 1

    asyncio.run(scenario())


def test_client_rpc_reply_goes_to_the_process_whose_id_it_carries(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a", "b") as (_shared, (a, b)):
            asked = b.hub.client_rpc(DEVICE, Transport.MQTT, "getTime", {})
            [request] = b.pipeline.of(RecordKind.RPC_REQUEST)
            assert request["id"].startswith("b-") and not a.hub.owns_client_rpc(request["id"])
            assert a.router.client_reply(request["id"], {"time": 42}, DEVICE.id)
            await settle()
            assert await asyncio.wait_for(asked, 1) == {"time": 42}
            assert not a.router.client_reply("a-1", {}, None)  # its own id: not forwarded
            assert not a.router.client_reply("plain", {}, None)  # no process in the id

    asyncio.run(scenario())


def test_malformed_router_messages_are_ignored(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a") as (_shared, (a,)):
            for bad in (b"not json", b"[]", b'{"t":"nope"}', b'{"t":"rpc"}', b'{"t":"outcome","ticket":"x"}', b"[1]"):
                a.router.on_message(bad)
            a.router.on_message(b'{"t":"outcome","ticket":99,"id":1}')  # nobody waits on ticket 99: dropped
            _, waiting = a.hub.send_rpc(DEVICE.id, "m", None, timeout_ms=5000)
            await settle()
            a.hub.hand_off(DEVICE.id)  # as when it went elsewhere
            ticket = a.router._ticket(
                waiting, a.hub.rpc.submit(DEVICE.id, "m", None, oneway=False, expires_at=0, now=0)[0]
            )
            a.router.on_message(orjson.dumps({"t": "outcome", "ticket": ticket, "id": 1, "request": "not an object"}))
            a.router.on_shared(b'{"instance":"x","device":"d","change":[1]}')
            assert a.hub.rpc.pending == 0 and a.outcomes() == [] and not waiting.done()

    asyncio.run(scenario())


def test_admin_shared_change_reaches_the_other_instances_once(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with cluster(tmp_path, clock, "a/0", "a/1", "b/0") as (shared, (a0, a1, b0)):
            sessions = [
                w.hub.attach(s) or s for w, s in ((a0, FakeSession()), (a1, FakeSession()), (b0, FakeSession()))
            ]
            for worker, session in zip((a0, a1, b0), sessions, strict=True):
                worker.hub.subscribe(session, Feature.ATTRIBUTES)
            document = {"update": {"target": 21.5}}
            for worker in (a0, a1):  # what the CLI does on instance a: every worker applies it
                worker.hub.change_shared(DEVICE.id, parse_change(document))
            a0.router.share(DEVICE.id, document)  # and worker 0 tells the other instances
            await settle()
            assert [s.attributes for s in sessions] == [[{"target": 21.5}]] * 3  # once each, b included
            assert b0.hub.shared_snapshot(DEVICE.id) == {"target": 21.5}
            b0.router.on_shared(b'{"instance":"x","device":"dev-1","change":{"update":"no"}}')  # malformed
            b0.router.on_shared(b"{}")
            assert sessions[2].attributes == [{"target": 21.5}]
            shared.up = False
            a0.router.share(DEVICE.id, {"update": {"target": 1}})  # Redis down: not sent, nothing breaks
            await settle()
            assert sessions[2].attributes == [{"target": 21.5}]

    asyncio.run(scenario())
