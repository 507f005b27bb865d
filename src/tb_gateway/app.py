"""Composition root: builds every part from the settings and owns every task in one TaskGroup.

Start-up: sink -> pipeline -> servers (a port that cannot be bound stops start-up). Shutdown on SIGTERM /
SIGINT, in order, each step bounded by SHUTDOWN_TIMEOUT_SECONDS: stop accepting -> drain sessions (answer what
was admitted) -> flush the pipeline -> close the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tb_gateway import blocklist
from tb_gateway.admin import AdminServer
from tb_gateway.attributes import AttributeStore
from tb_gateway.auth import AuthService, CredentialSource
from tb_gateway.auth_thingsboard import forget_token
from tb_gateway.config import Settings
from tb_gateway.device_api import DeviceApi
from tb_gateway.downlink.hub import Downlink, DownlinkSource
from tb_gateway.metrics import Metrics
from tb_gateway.pipeline import Pipeline
from tb_gateway.records import DeviceIdentity
from tb_gateway.registry import Registry, RegistryCredentials
from tb_gateway.servers import Server
from tb_gateway.sinks.base import Sink
from tb_gateway.sinks.store import StoreSink
from tb_gateway.workers import report_ready, watch_supervisor

if TYPE_CHECKING:
    from tb_gateway.downlink.router import Router
    from tb_gateway.redis_cache import RedisCache

log = logging.getLogger("tb_gateway")

REGISTRY_POLL_S = 1.0  # how soon a `tb-gateway device remove` reaches the running gateway's cache

Health = Callable[[], tuple[bool, dict[str, Any]]]


def build_sink(settings: Settings, metrics: Metrics, on_token_rejected: Callable[[str], object] | None = None) -> Sink:
    if settings.kafka_enabled:
        return _kafka_sink(settings, metrics)
    if settings.tb_http_enabled:
        return _thingsboard_sink(settings, metrics, on_token_rejected)
    removed = metrics.store_segments_removed
    return StoreSink(
        settings.data_dir / "messages",
        max_bytes=settings.store_max_bytes,
        max_age_s=settings.store_retention_hours * 3600,
        on_removed=lambda reason: removed.labels(reason=reason).inc(),
    )


def _kafka_sink(settings: Settings, metrics: Metrics) -> Sink:
    """Kafka, behind the spool unless SPOOL_ENABLED=false (docs/kafka-records.md)."""
    from tb_gateway.sinks.kafka import KafkaSink
    from tb_gateway.sinks.reliable import SpoolingSink
    from tb_gateway.sinks.spool import Spool

    primary = KafkaSink.from_settings(settings, metrics)
    if not settings.spool_enabled:
        return primary
    return SpoolingSink(primary, Spool(spool_dir(settings, primary.name), settings.spool_max_bytes), metrics)


def _thingsboard_sink(settings: Settings, metrics: Metrics, on_token_rejected: Callable[[str], object] | None) -> Sink:
    """ThingsBoard's HTTP device API, behind the spool unless SPOOL_ENABLED=false (docs/thingsboard-backend.md)."""
    from tb_gateway.sinks.reliable import SpoolingSink
    from tb_gateway.sinks.spool import Spool
    from tb_gateway.sinks.thingsboard import ThingsBoardSink

    primary = ThingsBoardSink.from_settings(settings, metrics, on_token_rejected)
    if not settings.spool_enabled:
        return primary
    spool = Spool(spool_dir(settings, primary.name), settings.spool_max_bytes)
    return SpoolingSink(primary, spool, metrics)


def spool_dir(settings: Settings, sink: str) -> Path:
    """DATA_DIR/spool/<sink>; worker i > 0 of WORKERS has its own beside it (a spool has one writer), worker 0
    keeps the plain path so going from one worker to several strands nothing."""
    base = settings.data_dir / "spool"
    return base / sink if not settings.worker_index else base / f"worker-{settings.worker_index}" / sink


def build_sources(settings: Settings, registry: Registry, metrics: Metrics | None = None) -> list[CredentialSource]:
    sources: list[CredentialSource] = [RegistryCredentials(registry)]
    if settings.tb_auth_active:  # after the registry: a locally added device never costs a backend call
        from tb_gateway.auth_thingsboard import ThingsBoardCredentialSource

        sources.append(ThingsBoardCredentialSource.from_settings(settings, metrics or Metrics()))
    return sources


def build_downlink_sources(
    settings: Settings, downlink: Downlink, metrics: Metrics, router: Router | None = None
) -> list[DownlinkSource]:
    """Kafka's downlink topics when Kafka is on; the admin API (always there, localhost) serves the CLI."""
    if not (settings.kafka_enabled and settings.kafka_downlink_enabled):
        return []
    from tb_gateway.downlink.kafka_source import KafkaDownlinkSource

    name = None if router is None else process_name(settings)
    return list(KafkaDownlinkSource.from_settings(settings, downlink, metrics, router, name))


def process_name(settings: Settings) -> str:
    """Stable for a DATA_DIR (one instance) and a worker index: names this process's own consumer group,
    which must survive restarts (a new name would re-read the shared-attribute topic and leave groups behind)."""
    name = instance_name(settings)
    return name if settings.worker_index is None else f"{name}-worker-{settings.worker_index}"


def instance_name(settings: Settings) -> str:
    """The instance's id, kept in DATA_DIR/instance-id (the workers of an instance share it)."""
    path = settings.data_dir / "instance-id"
    path.parent.mkdir(parents=True, exist_ok=True)
    # the first worker to start names the instance; the others read it
    with contextlib.suppress(FileExistsError), path.open("x") as created:
        created.write(uuid.uuid4().hex[:12])
    for _ in range(50):
        name = path.read_text().strip()
        if name:
            break
        time.sleep(0.01)  # another worker is writing it
    return name


def build_servers(settings: Settings, api: DeviceApi, health: Health) -> list[Server]:
    servers: list[Server] = []
    if settings.http_enabled:
        from tb_gateway.http.server import HttpServer

        servers.append(HttpServer(api, health))
    if settings.mqtt_enabled:
        from tb_gateway.mqtt.server import MqttServer

        servers.append(MqttServer(api))
    if settings.coap_enabled:
        from tb_gateway.coap.server import CoapServer

        servers.append(CoapServer(api))
    return servers


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry = Registry(settings.data_dir / "registry.db")
        self.sink = build_sink(settings, self.metrics, lambda token: forget_token(self.auth, token))
        self.pipeline = Pipeline(
            self.sink,
            self.metrics,
            batch_size=settings.batch_size,
            batch_timeout_s=settings.batch_timeout,
            commit_interval_s=settings.store_commit_interval if isinstance(self.sink, StoreSink) else 0.0,
            max_queue=settings.queue_max_records,
        )
        self.session_closers: list[Callable[[str, str], object]] = []  # (device id, reason): close its sessions
        self.redis = _redis(settings, self)
        self.auth = AuthService(
            build_sources(settings, self.registry, self.metrics),
            self.metrics,
            ttl_s=settings.auth_cache_ttl_seconds,
            negative_ttl_s=settings.auth_negative_cache_ttl_seconds,
            max_entries=settings.auth_cache_max_entries,
            shared=self.redis,
            blocklist=blocklist.configured(settings),
        )
        self.attributes = AttributeStore(settings.data_dir / "attributes.db")
        self.api = DeviceApi(settings, self.auth, self.pipeline, self.attributes, self.metrics)
        # RPC outcomes and device state go to Kafka or the embedded store; ThingsBoard's HTTP API takes none
        forwards_to_thingsboard = not settings.kafka_enabled and settings.tb_http_enabled
        submit = None if forwards_to_thingsboard else self.pipeline.submit
        self.downlink = Downlink.from_settings(settings, self.attributes, self.metrics, submit, self.api.session_limits)
        self.api.downlink = self.downlink
        self.session_closers.append(self._close_downlink_sessions)
        self.downlink.connect_listeners.append(self._device_connected)
        self.router = _router(self)
        self.admin = AdminServer.from_settings(settings, self.downlink, self.registry)
        if self.router is not None and not settings.worker_index:  # the CLI tells every worker; one tells the rest
            self.admin.shared_listeners.append(self.router.share)
        self.downlink_sources = build_downlink_sources(settings, self.downlink, self.metrics, self.router)
        self.servers = build_servers(settings, self.api, self.health)
        self._stop = asyncio.Event()

    def health(self) -> tuple[bool, dict[str, Any]]:
        sink = self.sink.health()
        pipeline = {
            "status": "down" if self.pipeline.closing else "up",
            "queue_depth": self.pipeline.depth,
            "queue_max_records": self.settings.queue_max_records,
        }
        components = {"pipeline": pipeline, "sink": sink}
        components.update({server.name: {"status": "up"} for server in self.servers})
        if self.redis is not None:
            components["redis"] = self.redis.health()
        ok = all(c.get("status") != "down" for c in components.values())
        degraded = any(c.get("status") == "degraded" for c in components.values())
        status = "down" if not ok else "degraded" if degraded else "up"
        return ok, {"status": status, "components": components}

    def device_revoked(self, device_id: str) -> None:
        """Removed or revoked here or on another instance: forget its credentials, close its sessions."""
        self.auth.invalidate(lambda _credentials, identity: identity is not None and identity.id == device_id)
        self.close_sessions(device_id, "revoked")

    def close_sessions(self, device_id: str, reason: str) -> None:
        for close in self.session_closers:
            close(device_id, reason)

    def _device_connected(self, device: DeviceIdentity) -> None:
        """A connection here: with Redis, the device's session on any other instance is closed."""
        if self.redis is not None:
            self.redis.announce_session(device.id, time.time())

    def _close_downlink_sessions(self, device_id: str, reason: str) -> None:
        """Revoked: every session of the device; taken over elsewhere: its connections (MQTT)."""
        doomed = [s for s in self.downlink.sessions.sessions(device_id) if reason != "taken_over" or s.connection]
        if doomed:
            log.info("closing %d session(s) of device %s: %s", len(doomed), device_id, reason)
        for session in doomed:
            session.close(reason)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until ``request_stop``, shut down in order.

        A start-up failure (a port that cannot be bound, TLS files, ...) propagates, from inside the TaskGroup
        as an ExceptionGroup (the CLI unwraps it), once everything started before it is stopped again: the
        TaskGroup cancels the tasks, ``_undo_start_up`` closes listeners, the admin API, the sink and clients.
        """
        s = self.settings
        metrics_server = None
        starting: list[Server] = []  # the listeners asked to start, the failing one included (MQTT binds 2)
        ready = False
        try:
            await self.sink.start()
            try:
                metrics_server = _start_metrics(s, self.metrics)
            except OSError as exc:
                where = f"METRICS_BIND_ADDRESS={s.metrics_bind_address}, METRICS_PORT={s.metrics_port}"
                raise _named(f"metrics endpoint ({where})", exc) from exc
            async with asyncio.TaskGroup() as tasks:
                pipeline_task = tasks.create_task(self.pipeline.run(), name="pipeline")
                sink_task = tasks.create_task(self.sink.run(), name="sink")
                watcher = tasks.create_task(self._watch_registry(), name="registry-watch")
                await _started(f"admin API (ADMIN_PORT={s.admin_port})", self.admin.start())
                downlink = [tasks.create_task(self.downlink.run(), name="downlink")]
                downlink.append(tasks.create_task(self.admin.run(), name="admin"))
                downlink += [tasks.create_task(src.run(), name=src.name) for src in self.downlink_sources]
                if self.redis is not None:
                    tasks.create_task(self.redis.run(), name="redis")
                if self.router is not None:
                    downlink.append(tasks.create_task(self.router.run(), name="downlink-router"))
                for server in self.servers:
                    starting.append(server)
                    await _started(_listener(s, server.name), server.start())
                ready = True
                _tune_gc()
                log.info(
                    "gateway ready" if s.worker_index is None else "worker ready",  # WORKERS: the supervisor says it
                    extra={"servers": [server.name for server in self.servers], "sink": self.sink.name}
                    | ({} if s.worker_index is None else {"worker": s.worker_index}),
                )
                report_ready(metrics_server.server_port)
                await self._stop.wait()
                log.info("shutting down")
                await self._shutdown(pipeline_task, sink_task, watcher, *downlink)
        finally:
            if not ready:
                await self._undo_start_up(starting)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.attributes.close()
            self.registry.close()
        log.info("stopped")

    async def _undo_start_up(self, started: list[Server]) -> None:
        """Start-up failed (the TaskGroup's tasks are already cancelled): stop what did start, each step bounded
        by SHUTDOWN_TIMEOUT_SECONDS; a failure here is logged, never hides the start-up problem."""
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        for server in started:
            server.stop_accepting()
            steps.append((f"{server.name} listener", server.drain))
        self.admin.close()
        for source in self.downlink_sources:
            source.close()
        self.downlink.close()
        steps += [("sink", self.sink.close), ("credential sources", self.auth.close)]
        if self.router is not None:
            steps.append(("downlink router", self.router.aclose))
        if self.redis is not None:
            steps.append(("redis", self.redis.close))
        for what, step in steps:
            try:
                async with asyncio.timeout(self.settings.shutdown_timeout_seconds):
                    await step()
            except Exception as exc:  # the start-up problem is the one line the operator must see
                log.debug("start-up failed; closing the %s failed too: %r", what, exc)

    async def _shutdown(self, pipeline_task: asyncio.Task[None], *others: asyncio.Task[None]) -> None:
        timeout = self.settings.shutdown_timeout_seconds
        for server in self.servers:
            server.stop_accepting()
        self.admin.close()
        for source in self.downlink_sources:
            source.close()
        self.downlink.close()  # pending RPCs end "cancelled" while the pipeline still takes records
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(server.drain() for server in self.servers))
        except TimeoutError:
            log.warning("sessions did not drain within %.1f s; closing anyway", timeout)
        self.pipeline.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(pipeline_task)
        except TimeoutError:
            log.error("pipeline did not flush within %.1f s", timeout)
            pipeline_task.cancel()
        await self.sink.close()
        await self.auth.close()
        if self.router is not None:
            await self.router.aclose()
        if self.redis is not None:
            await self.redis.close()
        for task in others:
            task.cancel()

    async def _watch_registry(self) -> None:
        version = self.registry.data_version()
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            current = self.registry.data_version()
            if current != version:
                version = current
                dropped = self.auth.invalidate_source(RegistryCredentials.name)
                log.info("device registry changed; dropped %d cached credentials", dropped)


def _redis(settings: Settings, gateway: Gateway) -> RedisCache | None:
    """REDIS_URL set -> the shared credential cache, revocations and session take-over (docs/scale-out.md)."""
    if not settings.redis_url:
        return None
    from tb_gateway.redis_cache import RedisCache

    return RedisCache(
        settings.redis_url,
        gateway.metrics,
        prefix=settings.redis_key_prefix,
        timeout_s=settings.redis_timeout_seconds,
        on_revoked=gateway.device_revoked,
        on_taken_over=lambda device_id: gateway.close_sessions(device_id, "taken_over"),
        on_reconnected=lambda: gateway.auth.invalidate(),
    )


def _router(gateway: Gateway) -> Router | None:
    """REDIS_URL set -> server-side RPCs and client-RPC replies reach the process holding the device."""
    if gateway.redis is None:
        return None
    from tb_gateway.downlink import router

    return router.build(gateway.downlink, gateway.redis, instance_name(gateway.settings))


def _listener(settings: Settings, name: str) -> str:
    """What a listener's start-up error names: the settings that say where it listens."""
    prefix = name.upper()
    where = f"{prefix}_BIND_ADDRESS={getattr(settings, f'{name}_bind_address')}"
    where += f", {prefix}_BIND_PORT={getattr(settings, f'{name}_bind_port')}"
    if name == "mqtt" and settings.mqtt_ssl_enabled:
        where += f", MQTT_SSL_BIND_PORT={settings.mqtt_ssl_bind_port}"
    return f"{prefix} listener ({where})"


async def _started(what: str, start: Awaitable[None]) -> None:
    """``await start``; an ``OSError`` (port in use, address that does not resolve) says which listener."""
    try:
        await start
    except OSError as exc:
        raise _named(what, exc) from exc


def _named(what: str, exc: OSError) -> OSError:
    named = OSError(f"{what}: {exc}")
    named.errno = exc.errno
    return named


def _start_metrics(settings: Settings, metrics: Metrics) -> Any:
    from prometheus_client import start_http_server

    server, _thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_bind_address, registry=metrics.registry
    )
    return server


async def serve(settings: Settings) -> None:
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.request_stop)
    watch_supervisor(loop, gateway.request_stop)  # WORKERS: a worker never outlives its supervisor
    try:
        await gateway.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def _tune_gc() -> None:
    """Start-up objects never die: freeze them out of the collector's scans, and collect the young generation
    less often (each message makes a few short-lived objects; the default threshold of 700 runs a collection
    every few dozen messages)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _raise_fd_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit to the hard one (often 1024 -> 1M)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(settings: Settings) -> None:
    import uvloop

    # `kill -USR1 <pid>` prints every thread's stack to stderr: the way to see where a stuck process is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if settings.workers > 1 and settings.worker_index is None:
        from tb_gateway.workers import supervise

        if not settings.redis_url:
            log.warning(
                "WORKERS=%d without REDIS_URL: a server-side RPC reaches its device only if the worker that reads "
                "it holds the device (tb-gateway rpc finds the holder itself); set REDIS_URL to route between "
                "workers (docs/scale-out.md)",
                settings.workers,
            )

        code = supervise(settings)
        if code:
            raise SystemExit(code)
        return

    _raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
