"""``WORKERS=N``: N gateway processes sharing the ports, under one supervisor (docs/scale-out.md).

One Python process uses one core. With ``WORKERS=N`` the ``tb-gateway run`` process becomes a supervisor: it
starts N workers (the same command, with ``WORKER_INDEX=i``), and each binds the MQTT, HTTP and CoAP ports
itself with SO_REUSEPORT, so the kernel spreads TCP connections and UDP source addresses across them (a CoAP
client keeps talking to the same worker: the hash is over the addresses). The supervisor holds no device
traffic; it only starts, watches and stops workers and serves the merged metrics.

Workers never die silently: an unexpected exit is logged as an error with its code and the worker is started
again under the same index (its ports are shared, so the others serve meanwhile); a worker that keeps dying
(``MAX_RESTARTS`` within ``RESTART_WINDOW_S``) stops the whole gateway with a non-zero exit, for the service
manager to see. SIGTERM / SIGINT: every worker gets SIGTERM and runs its own ordered shutdown; stragglers
are killed after a bound.

Metrics — why scrape-and-merge rather than prometheus_client's multiprocess mode: multiprocess mode swaps
every metric value for an mmap-backed one (slower increments on the per-message hot path), needs its
environment set before the first import and a directory cleaned between runs, and cannot merge gauges
without a mode per gauge. Here each worker serves its own registry on a private 127.0.0.1 port (it reports
the port through a pipe once ready) and the supervisor's METRICS_PORT answers a scrape by scraping the
workers and merging: counters, histograms and gauges add up (``devices_connected`` over all workers is the
gateway's), except the few where a sum means nothing (``MERGE``). The names and labels are the same as with
one worker, so dashboards do not change with WORKERS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tb_gateway.config import Settings

log = logging.getLogger("tb_gateway")

STATUS_FD = "TB_GATEWAY_STATUS_FD"  # the pipe a worker reports readiness on (not a setting: set by us)
LIFELINE_FD = "TB_GATEWAY_LIFELINE_FD"  # a pipe the supervisor holds open: EOF = it died, the worker stops
READY_TIMEOUT_S = 60.0  # a worker that is not serving within this stops start-up
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # a worker dying more often than this stops the gateway
POLL_S = 0.1  # how often the supervisor looks at its workers
SCRAPE_TIMEOUT_S = 2.0

# gauges whose sum over workers means nothing; every other sample adds up
MERGE: dict[str, Callable[[float, float], float]] = {
    "tb_gateway_spool_oldest_age_seconds": max,
    "tb_gateway_redis_up": min,  # 1 only while every worker hears Redis
}


def report_ready(metrics_port: int) -> None:
    """Called by a worker once it serves: tells the supervisor its private metrics port. No-op otherwise."""
    fd = os.environ.get(STATUS_FD)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), orjson.dumps({"ready": True, "metrics_port": metrics_port}) + b"\n")
        os.close(int(fd))


def watch_supervisor(loop: asyncio.AbstractEventLoop, stop: Callable[[], object]) -> None:
    """In a worker: stop cleanly when the supervisor is gone (even killed with SIGKILL), never linger as an
    orphan holding the ports. The supervisor keeps the write end of a pipe open; its death closes it."""
    fd = os.environ.get(LIFELINE_FD)
    if fd is None:
        return
    lifeline = int(fd)

    def readable() -> None:
        try:
            data = os.read(lifeline, 64)
        except BlockingIOError:
            return
        if not data:
            log.error("the supervisor is gone: stopping this worker")
            loop.remove_reader(lifeline)
            stop()

    os.set_blocking(lifeline, False)
    loop.add_reader(lifeline, readable)


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    status_fd: int
    metrics_port: int | None = None
    restarts: list[float] = field(default_factory=list)
    buffer: bytes = b""

    def read_status(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.buffer += os.read(self.status_fd, 4096)
        line, sep, _ = self.buffer.partition(b"\n")
        if sep and self.metrics_port is None:
            self.metrics_port = int(orjson.loads(line)["metrics_port"])


Key = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, labels
Endpoint = tuple[int, int, int | None]  # a worker's index, its process id, its metrics port (None: not up)


class MergedWorkers:
    """A collector that scrapes every worker and adds up their samples (see the module docstring).

    Counters and histograms never go down when a worker dies: what a worker's earlier process had counted
    (its last scrape) is carried into the sums once a new process holds its index, and a worker that cannot
    be scraped counts with its last scrape meanwhile. Prometheus would read a dip as a counter reset and
    show a false spike in ``rate()``.
    """

    def __init__(self, workers: Callable[[], list[Endpoint]], scrape_failures: Counter) -> None:
        self._workers = workers
        self._failures = scrape_failures
        self._last: dict[int, tuple[int, dict[Key, float]]] = {}  # index -> (pid, monotonic samples last scraped)
        self._carried: dict[Key, float] = {}  # monotonic samples of workers' earlier processes
        self._kinds: dict[str, tuple[str, str]] = {}  # family -> (documentation, type), as last scraped

    def collect(self) -> Iterator[Metric]:
        values: dict[Key, float] = dict(self._carried)
        for index, pid, port in self._workers():
            seen_pid, last = self._last.get(index, (pid, {}))
            if seen_pid != pid:  # a new process under this index: the old one's counts carry on
                for key, value in last.items():
                    self._carried[key] = self._carried.get(key, 0.0) + value
                    values[key] = values.get(key, 0.0) + value
                last = {}
            text = self._scrape(port) if port is not None else None
            if text is None:  # down or unreachable: its counts as last seen
                for key, value in last.items():
                    values[key] = values.get(key, 0.0) + value
                self._last[index] = (pid, last)
                continue
            self._last[index] = (pid, self._merge(text, values))
        families: dict[str, Metric] = {}
        for (family_name, sample_name, labels), value in values.items():
            if family_name not in families:
                documentation, kind = self._kinds[family_name]
                families[family_name] = Metric(family_name, documentation, kind)
            families[family_name].add_sample(sample_name, dict(labels), value)
        yield from families.values()

    def _scrape(self, port: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
                return str(answer.read().decode())
        except OSError:
            self._failures.inc()
            return None

    def _merge(self, text: str, values: dict[Key, float]) -> dict[Key, float]:
        """Add one worker's samples into ``values``; returns its monotonic ones (counters, histograms)."""
        monotonic: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            self._kinds[family.name] = (family.documentation, family.type)
            merge = MERGE.get(family.name, _add) if family.type == "gauge" else _add
            counts = family.type in ("counter", "histogram", "summary")
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                created = sample.name.endswith("_created")
                op = min if created else merge  # _created: a start time
                values[key] = op(values[key], sample.value) if key in values else sample.value
                if counts and not created:
                    monotonic[key] = sample.value
        return monotonic


def _add(a: float, b: float) -> float:
    return a + b


def _prepare_files(settings: Settings) -> None:
    """Create the SQLite files (in WAL mode) before the workers open them all at once."""
    from tb_gateway.attributes import AttributeStore
    from tb_gateway.registry import Registry

    Registry(settings.data_dir / "registry.db").close()
    AttributeStore(settings.data_dir / "attributes.db").close()


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[Worker] = []
        self.stopping = False
        self.registry = CollectorRegistry()
        self.alive = Gauge("tb_gateway_workers", "Worker processes running (WORKERS)", registry=self.registry)
        self.restarted = Counter(
            "tb_gateway_worker_restarts_total",
            "Workers started again after an unexpected exit, by worker index",
            ["worker"],
            registry=self.registry,
        )
        scrape_failures = Counter(
            "tb_gateway_worker_scrape_failures_total",
            "Scrapes of a worker's metrics that failed (that worker's samples are missing from that scrape)",
            registry=self.registry,
        )
        self.registry.register(MergedWorkers(self._endpoints, scrape_failures))
        self._lifeline = os.pipe()  # workers hold the read end; only this process holds the write end

    def _endpoints(self) -> list[Endpoint]:
        return [(w.index, w.proc.pid, w.metrics_port if w.proc.poll() is None else None) for w in self.workers]

    def _spawn(self, index: int) -> Worker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = dict(os.environ)
        env.update(
            WORKER_INDEX=str(index),
            METRICS_PORT="0",
            METRICS_BIND_ADDRESS="127.0.0.1",
            **{STATUS_FD: str(write_fd), LIFELINE_FD: str(self._lifeline[0])},
        )
        passed = (write_fd, self._lifeline[0])
        proc = subprocess.Popen([sys.executable, "-m", "tb_gateway", "run"], env=env, pass_fds=passed)
        os.close(write_fd)
        return Worker(index, proc, read_fd)

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        """Start every worker, watch them until a signal, stop them all; the process exit code."""
        from prometheus_client import start_http_server

        s = self.settings
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        _prepare_files(s)
        self.workers = [self._spawn(i) for i in range(s.workers)]
        try:
            if not self._await_ready():
                return 0 if self.stopping else 1
            server, _thread = start_http_server(s.metrics_port, addr=s.metrics_bind_address, registry=self.registry)
            try:
                ready = [{"worker": w.index, "pid": w.proc.pid, "metrics_port": w.metrics_port} for w in self.workers]
                log.info("gateway ready", extra={"workers": ready})
                return self._watch()
            finally:
                server.shutdown()
                server.server_close()
        finally:
            self._stop_all()

    def _await_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.stopping and time.monotonic() < deadline:
            for worker in self.workers:
                worker.read_status()
                if worker.proc.poll() is not None:
                    log.error("worker %d exited with code %s before it was ready", worker.index, worker.proc.returncode)
                    return False
            if all(w.metrics_port is not None for w in self.workers):
                self.alive.set(len(self.workers))
                return True
            time.sleep(POLL_S)
        if not self.stopping:
            log.error("workers not ready within %.0f s", READY_TIMEOUT_S)
        return False

    def _watch(self) -> int:
        while not self.stopping:
            time.sleep(POLL_S)
            for i, worker in enumerate(self.workers):
                worker.read_status()
                code = worker.proc.poll()
                if code is None or self.stopping:
                    continue
                now = time.monotonic()
                recent = [t for t in worker.restarts if now - t < RESTART_WINDOW_S]
                if len(recent) >= MAX_RESTARTS:
                    log.error("worker %d keeps exiting (last code %s): stopping the gateway", worker.index, code)
                    return 1
                log.error(
                    "worker %d (pid %d) exited with code %s; starting it again", worker.index, worker.proc.pid, code
                )
                self.restarted.labels(worker=str(worker.index)).inc()
                os.close(worker.status_fd)
                fresh = self._spawn(worker.index)
                fresh.restarts = [*recent, now]
                self.workers[i] = fresh
            self.alive.set(sum(w.proc.poll() is None for w in self.workers))
        return 0

    def _stop_all(self) -> None:
        """SIGTERM to each worker (each shuts down in order), then wait; kill what outlives the bound."""
        log.info("stopping %d workers", len(self.workers))
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 4 * self.settings.shutdown_timeout_seconds + 5
        for worker in self.workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.proc.kill()
                worker.proc.wait()
            with contextlib.suppress(OSError):
                os.close(worker.status_fd)
        self.alive.set(0)
        log.info("stopped")


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()
