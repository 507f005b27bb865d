"""Wall-clock milliseconds: what records are stamped with (``ts`` when the device gave none, ``received_at``).

One function for every component that needs it; in C when built (``_speedups.now_ms``), since the transports
read it once per socket read and a Python function costs a frame each time.
"""

from __future__ import annotations

import time

__all__ = ["now_ms", "now_ms_py"]


def now_ms_py() -> int:
    return time.time_ns() // 1_000_000


try:
    from tb_gateway._speedups import now_ms
except ImportError:  # pragma: no cover - built without a C compiler
    now_ms = now_ms_py
