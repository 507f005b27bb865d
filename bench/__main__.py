"""`make bench`: run the benchmarks, print a table of figures and ratios, save JSON under bench/results/.

python -m bench [--only mqtt,coap,http,idle,kafka,workers,floor,storecost] [--seconds 10]
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from bench.common import fdatasync_cost, ratio_cell, save, table

SCENARIOS: dict[str, tuple[str, str]] = {
    "http": ("bench.http_bench", "throughput"),
    "mqtt": ("bench.mqtt_bench", "throughput"),
    "coap": ("bench.coap_bench", "throughput"),
    "idle": ("bench.mqtt_bench", "idle_memory"),
    "kafka": ("bench.kafka_bench", "throughput"),
    "workers": ("bench.workers_bench", "throughput"),  # WORKERS=2 vs 1 (docs/scale-out.md)
    "floor": ("bench.floor", "throughput"),  # Python + uvloop doing nothing else, against the references
    "storecost": ("bench.store_cost", "throughput"),  # HTTP with the store's write cut short at each point
}


def _scenario(name: str) -> Callable[..., Any]:
    module, function = SCENARIOS[name]
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    args = parser.parse_args()
    rows: list[tuple[str, ...]] = [
        ("scenario", "gateway/s", "reference/s", "ratio", "p50 ms", "p99 ms", "gen CPU", "server CPU")
    ]
    disk = fdatasync_cost()  # every 2xx / PUBACK / 2.01 waits for one: the machine's figure explains a lot
    print(
        f"this disk: pwrite + fdatasync of 4 KiB takes {disk['p50_us']:.0f} us (p99 {disk['p99_us']:.0f} us) "
        f"and {disk['cpu_us']:.0f} us of CPU"
    )
    results: dict[str, Any] = {"disk": disk}
    for name in args.only.split(","):
        run = _scenario(name)
        outcome = run() if name == "idle" else run(args.seconds)
        results[name] = outcome
        for row in outcome if isinstance(outcome, list) else []:
            ours, ref = row["gateway"], row["reference"]
            rows.append(
                (
                    row["scenario"],
                    f"{ours['rate_per_s']:,.0f}",
                    f"{ref['rate_per_s']:,.0f} ({row['reference_name']})" if ref else "-",
                    ratio_cell(row),
                    f"{ours.get('p50_ms', 0):.2f}",
                    f"{ours.get('p99_ms', 0):.2f}",
                    f"{ours.get('generator_cpu_s', 0):.1f}s",
                    f"{ours['server_cpu_share']:.0%}" if "server_cpu_share" in ours else "-",
                )
            )
        if name == "idle":
            print(f"idle MQTT connections: {outcome['kib_per_connection']:.2f} KiB resident each ({outcome['opened']})")
    print(table(rows))
    print(f"saved {save('bench', results)}")


if __name__ == "__main__":
    main()
