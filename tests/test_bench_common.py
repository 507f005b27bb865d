"""The bench's bookkeeping: alternated rounds, and ratios taken round by round (bench/common.py)."""

from __future__ import annotations

from itertools import count
from typing import Any

from bench.common import alternate, ratio_cell, result_row, round_ratios
from bench.http_bench import median_round


def test_alternate_interleaves_the_runs_and_keeps_every_rounds_rate() -> None:
    order: list[str] = []
    ticks = count()

    def run(name: str, rates: list[float]) -> Any:
        def one() -> dict[str, Any]:
            order.append(name)
            return {"rate_per_s": rates[next(ticks) // 2]}

        return one

    medians = alternate({"ref": run("ref", [100.0, 50.0, 80.0]), "gw": run("gw", [60.0, 30.0, 40.0])}, rounds=3)
    assert order == ["ref", "gw"] * 3
    assert medians["ref"]["rate_per_s"] == 80.0 and medians["ref"]["rounds"] == [100, 50, 80]
    assert medians["gw"]["rate_per_s"] == 40.0 and medians["gw"]["rounds"] == [60, 30, 40]


def test_the_ratio_is_the_median_of_the_paired_rounds_when_the_machine_drifts() -> None:
    # the machine slows down by half in round 2: each pair says 0.6x, 0.6x, 0.5x; the medians' ratio 0.5x
    ours = {"rate_per_s": 40.0, "rounds": [60, 30, 40]}
    reference = {"rate_per_s": 80.0, "rounds": [100, 50, 80]}
    assert round_ratios(ours, reference) == [0.6, 0.6, 0.5]
    row = result_row("s", ours, reference, "ref")
    assert row["ratio"] == 0.6 and row["round_ratios"] == [0.6, 0.6, 0.5]
    assert ratio_cell(row) == "0.60x (0.50-0.60)"


def test_without_matching_rounds_the_ratio_is_of_the_two_rates() -> None:
    row = result_row("s", {"rate_per_s": 30.0}, {"rate_per_s": 60.0, "rounds": [60]}, "ref")
    assert row["ratio"] == 0.5 and row["round_ratios"] == [] and ratio_cell(row) == "0.50x"
    assert result_row("s", {"rate_per_s": 1.0})["ratio"] is None
    assert ratio_cell(result_row("s", {"rate_per_s": 1.0})) == "-"
    assert round_ratios({"rounds": [1, 2]}, {"rounds": [1]}) == []


def test_http_takes_the_median_run_and_keeps_the_rounds_in_order() -> None:
    runs = [{"rate_per_s": 30.4, "p99_ms": 1}, {"rate_per_s": 10.0, "p99_ms": 2}, {"rate_per_s": 20.0, "p99_ms": 3}]
    median = median_round(runs)
    assert median["rate_per_s"] == 20.0 and median["p99_ms"] == 3 and median["rounds"] == [30, 10, 20]
