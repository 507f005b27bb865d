"""bench/store_variant.py replaces SegmentWriter internals: a refactor of the store must not silently turn
the bench's variants into something else (README, "What the durable write costs")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.store_variant import VARIANTS
from tb_gateway import _speedups
from tb_gateway.sinks.segments import SegmentWriter, read_log


def _writer(tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> SegmentWriter:
    for name, replacement in VARIANTS[variant].items():
        assert hasattr(SegmentWriter, name), name
        monkeypatch.setattr(SegmentWriter, name, replacement)
    writer = SegmentWriter(tmp_path, 1 << 20)
    writer.open()
    return writer


def test_as_is_appends_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _writer(tmp_path, "as-is", monkeypatch)
    assert writer.append([b'{"a":1}']) == 1
    assert writer.append([b'{"a":2}', b'{"a":3}']) == 2
    writer.close()
    assert [seq for seq, _ in read_log(tmp_path)] == [1, 2, 3]


def test_no_fdatasync_writes_at_the_tail_without_syncing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _writer(tmp_path, "no-fdatasync", monkeypatch)
    assert writer.append([b'{"a":1}']) == 1  # the first write zeroes ahead on the locked path, durably

    def refused(*_: object) -> None:
        raise AssertionError("synced")

    monkeypatch.setattr(os, "fdatasync", refused)
    monkeypatch.setattr(_speedups, "append_durably", refused)
    assert writer.append([b'{"a":2}', b'{"a":3}']) == 2
    writer.close()
    assert [payload for _, payload in read_log(tmp_path)] == [b'{"a":1}', b'{"a":2}', b'{"a":3}']


def test_no_append_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _writer(tmp_path, "no-append", monkeypatch)
    assert writer.append([b'{"a":1}']) == 1
    writer.close()
    assert list(read_log(tmp_path)) == []


def test_the_lane_cost_harness_measures_the_fast_lane() -> None:
    """bench/lane_cost.py (README, "Where the lanes' time went") fails when the fast lane did not take every
    timed request or a connection went unanswered; here it must run clean (in its own process: it patches
    the store)."""
    repo = Path(__file__).resolve().parents[1]
    args = ["--connections", "40", "--rounds", "5", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.lane_cost", *args], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "µs per request" in done.stdout
