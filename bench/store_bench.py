"""Micro-benchmark of the embedded store: ``StoreSink.deliver`` latency for 1, 50 and 500-record batches.

python -m bench.store_bench [--rounds 300] [--dir DIR]

Each round is one awaited ``deliver`` (durable on return), so the figures are the commit latency that bounds
HTTP / CoAP throughput (records per batch / latency). DIR must be on the disk the gateway's DATA_DIR uses.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.store import StoreSink

DEVICE = DeviceIdentity("3fd35c1d-8758-4351-b985-ad1507d2f630", "thermostat-1")


def batch(size: int, start: int) -> list[Record]:
    now = int(time.time() * 1000)
    return [
        Record(
            DEVICE,
            RecordKind.TELEMETRY,
            now + i,
            {"temperature": 25.5, "humidity": 60, "n": start + i},
            Transport.HTTP,
            now,
        )
        for i in range(size)
    ]


async def measure(path: Path, size: int, rounds: int) -> tuple[float, float, float]:
    sink = StoreSink(path)
    await sink.start()
    try:
        for i in range(20):  # warm up: files created, caches hot
            await sink.deliver(batch(size, i * size))
        samples = []
        for i in range(rounds):
            records = batch(size, i * size)
            t0 = time.perf_counter()
            await sink.deliver(records)
            samples.append(time.perf_counter() - t0)
    finally:
        await sink.close()
    samples.sort()
    median = statistics.median(samples)
    return median * 1000, samples[int(len(samples) * 0.99) - 1] * 1000, size / median


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=Path.cwd() / "data")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{'batch':>6} {'p50 ms':>8} {'p99 ms':>8} {'records/s':>10}")
    for size in (1, 50, 500):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            p50, p99, rate = asyncio.run(measure(Path(tmp) / "messages", size, args.rounds))
        print(f"{size:>6} {p50:>8.3f} {p99:>8.3f} {rate:>10.0f}")


if __name__ == "__main__":
    main()
