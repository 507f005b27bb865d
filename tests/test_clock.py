"""clock.now_ms: the C reading is the Python one (time.time_ns() // 1_000_000), taken without a frame."""

from __future__ import annotations

import time

from tb_gateway import _speedups, clock


def test_the_c_clock_is_used_when_built() -> None:
    assert clock.now_ms is _speedups.now_ms


def test_c_and_python_readings_agree_in_order() -> None:
    for _ in range(1000):
        before = clock.now_ms_py()
        reading = _speedups.now_ms()
        after = time.time_ns() // 1_000_000
        assert type(reading) is int
        assert before <= reading <= after
