"""The Kafka benchmark's reading of the gateway's delivery histogram (bench/kafka_bench.py)."""

from __future__ import annotations

import pytest

from bench.kafka_bench import quantile_ms

INF = float("inf")


def test_quantiles_of_the_records_between_two_snapshots_interpolate_within_a_bucket() -> None:
    before = {0.001: 100.0, 0.005: 100.0, 0.01: 100.0, INF: 100.0}  # an earlier run, not to be counted
    after = {0.001: 100.0, 0.005: 180.0, 0.01: 200.0, INF: 200.0}  # 80 records in (1, 5] ms, 20 in (5, 10]
    assert quantile_ms(before, after, 0.5) == pytest.approx(1 + 4 * (50 / 80))
    assert quantile_ms(before, after, 0.8) == pytest.approx(5.0)
    assert quantile_ms(before, after, 0.99) == pytest.approx(5 + 5 * (19 / 20))


def test_a_quantile_in_the_open_bucket_is_the_highest_bound_and_nothing_observed_is_zero() -> None:
    after = {0.001: 0.0, 0.005: 10.0, INF: 20.0}
    assert quantile_ms({}, after, 0.99) == pytest.approx(5.0)
    assert quantile_ms(after, after, 0.5) == 0.0
