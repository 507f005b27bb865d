"""Free 127.0.0.1 ports for test and bench servers, chosen below the kernel's ephemeral range.

Binding port 0 hands out a port from the ephemeral range, which every outgoing connection on the
machine draws from too. A server that is given such a port and binds it a moment later (or again
after a restart) can find it taken by some client's connection: CI once failed on exactly that.
Ports below the range are only ever taken by something that binds them on purpose.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000  # well above the fixed ports users run on (1883, 5683, 8081, 9092)
_handed_out: set[int] = set()  # never give the same port twice in one process
_random = random.Random()  # unaffected by tests that seed the global generator


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port nothing is bound to now, that no outgoing connection will take, not handed out before."""
    highest = _ephemeral_start() - 1
    if highest - _LOWEST < 1000:  # an unusual range leaves no room below it: let the kernel choose
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(1000):
        port = _random.randint(_LOWEST, highest)
        if port not in _handed_out and _bindable(port, kind):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {_LOWEST}-{highest}")
