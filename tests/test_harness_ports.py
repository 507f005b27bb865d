"""The test harness's ports: below the ephemeral range, so no client connection can take one before its server binds."""

from __future__ import annotations

import socket

import pytest

from tests.harness import ports


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_ports_are_bindable_below_the_ephemeral_range_and_never_repeat(kind: socket.SocketKind) -> None:
    given = [ports.free_port(kind) for _ in range(200)]
    assert len(set(given)) == len(given)
    assert all(20000 <= port < ports._ephemeral_start() for port in given)
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", given[-1]))


def test_a_port_someone_holds_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports.free_port()))
        taken = held.getsockname()[1]
        ports._handed_out.discard(taken)  # only the bind check can refuse it now
        # the held port first, then ports no test was given (one of them may be in use outside the harness)
        others = [p for p in range(taken - 1, 19999, -1) if p not in ports._handed_out][:50]
        chosen = iter([taken, *others])
        monkeypatch.setattr(ports._random, "randint", lambda low, high: next(chosen))
        given = ports.free_port()
        assert given != taken and given in others
