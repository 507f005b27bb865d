"""Types of the optional C fast path (_speedups.c); each function returns None to mean "ask normalize.py"."""

from typing import Any

def values(raw: Any, type_cast: bool, max_string_length: int) -> dict[str, Any] | None: ...
def telemetry(
    document: Any, now_ms: int, type_cast: bool, max_string_length: int
) -> list[tuple[int, dict[str, Any]]] | None: ...
def frame(
    payloads: list[bytes], index: int, offset: int, seq: int, crc: int, room: int
) -> tuple[bytes, int, int, int, int]: ...
