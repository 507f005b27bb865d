"""Shared benchmark plumbing: pinned processes, the Go load generator, results on disk.

The server under test and the reference server each run pinned to core 0 (one at a time); the load generator
runs pinned to core 1 and reports its own CPU time, so a saturated generator is visible in the results.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "bin"
SERVER_CORE = "0"
LOAD_CORE = "1"
ROUNDS = 3  # alternated runs per comparison (median reported): single runs of mosquitto varied 89k-125k msg/s


def pinned(core: str, *cmd: str) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else list(cmd)


def cpu_s(pid: int) -> float:
    """utime + stime of a process and its children (nginx's worker), in seconds."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def with_server_cpu(pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result and the server's CPU time over it (connection set-up included): as a share of one
    core, and per acknowledged message. Shows how close to saturation a latency figure was taken."""
    before, start = cpu_s(pid), time.monotonic()
    result = run()
    used, wall = cpu_s(pid) - before, time.monotonic() - start
    acked = int(result.get("acked") or 0)
    return {**result, "server_cpu_share": used / wall, "server_us_per_msg": used / acked * 1e6 if acked else 0.0}


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def loadgen() -> Path:
    """Build the Go load generator once (standard library only, so no download)."""
    binary = CACHE / "loadgen"
    sources = list((ROOT / "bench" / "loadgen").glob("*.go"))
    if not binary.exists() or any(s.stat().st_mtime > binary.stat().st_mtime for s in sources):
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=ROOT / "bench" / "loadgen", check=True)
    return binary


def fdatasync_cost(samples: int = 400) -> dict[str, float]:
    """What one durable append costs on the disk the benchmarks' stores live on (4 KiB pwrite + fdatasync into
    a preallocated file whose space was zeroed first, as the embedded store does: sinks/segments.py,
    ``ZERO_AHEAD``): its wall time, which bounds how often a batch can leave, and its CPU, which the
    gateway's core pays per batch. Figures differ a lot between machines."""
    path = tempdir() / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, samples * 4096)
        os.pwrite(fd, bytes(samples * 4096), 0)
        os.fsync(fd)
        block = b"x" * 4096
        walls = []
        cpu = time.process_time()
        for i in range(samples):
            start = time.perf_counter()
            os.pwrite(fd, block, i * 4096)
            os.fdatasync(fd)
            walls.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu
    finally:
        os.close(fd)
        path.unlink()
    walls.sort()
    return {
        "p50_us": walls[len(walls) // 2] * 1e6,
        "p99_us": walls[len(walls) * 99 // 100] * 1e6,
        "cpu_us": cpu / samples * 1e6,
    }


def run_load(*args: str, timeout_s: float = 120.0) -> dict[str, Any]:
    out = subprocess.run(
        pinned(LOAD_CORE, str(loadgen()), *args), capture_output=True, text=True, timeout=timeout_s, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def process(cmd: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tempdir() -> Path:
    """A scratch directory removed when the bench exits: a gateway's store preallocates 64 MiB segments, and a
    full run left about 2 GB behind per run before this."""
    path = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def save(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def register_devices(data_dir: Path, token_prefix: str, count: int) -> None:
    """One registry device per load connection (tokens PREFIX-0 .. PREFIX-(count-1)), as `-devices` expects.

    Distinct devices matter: the gateway keeps one MQTT session per device, as ThingsBoard does, so connections
    sharing one token would take each other over.
    """
    from tb_gateway.registry import Registry

    registry = Registry(data_dir / "registry.db")
    try:
        with registry.transaction():
            for n in range(count):
                registry.add(f"bench-{n}", token=f"{token_prefix}-{n}")
    finally:
        registry.close()


def alternate(runs: dict[str, Callable[[], dict[str, Any]]], rounds: int = ROUNDS) -> dict[str, dict[str, Any]]:
    """Each run ``rounds`` times, interleaved (A B A B ...), and the median round of each by rate: the machine's
    drift (other tenants, turbo, page cache) then falls on both sides alike. Each result keeps every round's
    rate in ``rounds``."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    medians = {}
    for name, rows in results.items():
        ordered = sorted(rows, key=lambda row: float(row["rate_per_s"]))
        medians[name] = {**ordered[len(ordered) // 2], "rounds": [round(row["rate_per_s"]) for row in rows]}
    return medians


def median_latency(run: Callable[[], dict[str, Any]], rounds: int = ROUNDS) -> dict[str, Any]:
    """An open-loop latency run ``rounds`` times, and the round with the median p99: one 8-second run's p99
    varied from 8 to 30 ms at the same rate (its p50 hardly moved). Each round's p99 is kept in ``rounds_p99_ms``."""
    rows = [run() for _ in range(rounds)]
    ordered = sorted(rows, key=lambda row: float(row["p99_ms"]))
    return {**ordered[len(ordered) // 2], "rounds_p99_ms": [round(float(row["p99_ms"]), 2) for row in rows]}


def round_ratios(ours: dict[str, Any], reference: dict[str, Any]) -> list[float]:
    """The gateway's rate over the reference's, round by round, when both ran the same alternated rounds
    (``alternate``): each pair ran back to back, so the machine's drift between rounds cancels out."""
    mine, theirs = ours.get("rounds"), reference.get("rounds")
    if not mine or not theirs or len(mine) != len(theirs):
        return []
    return [m / t if t else 0.0 for m, t in zip(mine, theirs, strict=True)]


def result_row(
    scenario: str, ours: dict[str, Any], reference: dict[str, Any] | None = None, reference_name: str = "-"
) -> dict[str, Any]:
    """One row of the results table: the gateway's figures, and the reference's with the ratio when there is one.

    The ratio is the median of the round-by-round ratios when the runs alternated (on a machine whose speed
    drifts by a third within minutes, the ratio of the two medians can pair a fast round with a slow one),
    else the ratio of the two rates; ``round_ratios`` keeps every round's."""
    ratio, paired = None, []
    if reference is not None:
        paired = round_ratios(ours, reference)
        if paired:
            ratio = sorted(paired)[len(paired) // 2]
        else:
            ratio = ours["rate_per_s"] / reference["rate_per_s"] if reference["rate_per_s"] else 0.0
    return {
        "scenario": scenario,
        "gateway": ours,
        "reference": reference,
        "reference_name": reference_name,
        "ratio": ratio,
        "round_ratios": [round(r, 3) for r in paired],
    }


def ratio_cell(row: dict[str, Any]) -> str:
    """``0.57x``, or ``0.57x (0.51-0.63)`` with the range of the round-by-round ratios."""
    if row["reference"] is None:
        return "-"
    paired = row.get("round_ratios") or []
    spread = f" ({min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else ""
    return f"{row['ratio']:.2f}x{spread}"
