"""SeenTable (_seen.c) keeps the rules of coap/expiring.py's PeerWindowedMap: the same answers to every
sequence of operations, its memory bounded the same way, and nothing leaked or freed early."""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_gateway.coap.expiring import PeerWindowedMap

_speedups = pytest.importorskip("tb_gateway._speedups")
SeenTable = _speedups.SeenTable

PEERS = [("10.0.0.1", 5683), ("10.0.0.2", 5683), ("10.0.0.1", 40000)]
LIFETIMES = (145.0, 247.0)

op = st.one_of(
    st.tuples(
        st.just("put"),
        st.sampled_from(PEERS),
        st.integers(0, 9),
        st.integers(0, 1000),
        st.floats(0, 40),  # 0 too: an entry put again at the same instant must not be taken for its stale twin
        st.sampled_from(LIFETIMES),
    ),
    st.tuples(st.just("pop"), st.sampled_from(PEERS), st.integers(0, 9)),
    st.tuples(st.just("replace"), st.sampled_from(PEERS), st.integers(0, 9), st.integers(0, 1000)),
    st.tuples(st.just("expire"), st.floats(0, 300)),
)


def _apply(table: Any, step: tuple[Any, ...], now: float) -> tuple[Any, float]:
    kind = step[0]
    if kind == "put":
        _, peer, mid, value, advance, lifetime = step
        now += advance
        return table.put((peer, mid), value, now, lifetime), now
    if kind == "pop":
        return table.pop((step[1], step[2])), now
    if kind == "replace":  # swap what is there for a new value (the endpoint's answered exchange)
        key = (step[1], step[2])
        return table.replace(key, table.get(key), step[3]), now
    now += step[1]
    return table.expire(now), now


@settings(max_examples=300, deadline=None)
@given(cap=st.integers(1, 12), window=st.integers(1, 5), steps=st.lists(op, max_size=80))
def test_every_sequence_of_operations_answers_as_the_python_map_does(
    cap: int, window: int, steps: list[tuple[Any, ...]]
) -> None:
    reference: PeerWindowedMap[Any, int] = PeerWindowedMap(cap, window)
    table = SeenTable(cap, window)
    now_ref = now = 0.0
    for step in steps:
        expected, now_ref = _apply(reference, step, now_ref)
        got, now = _apply(table, step, now)
        assert got == expected, step
        assert len(table) == len(reference), step
        for peer in PEERS:
            assert [table.get((peer, mid)) for mid in range(10)] == [reference.get((peer, mid)) for mid in range(10)]
        stats = table.stats()
        assert stats["peers"] == len(reference._windows)  # a window goes with its last live entry
        assert stats["queued"] <= 2 * len(table) + cap // 8 + len(LIFETIMES)  # stale queue entries are bounded


def test_the_documented_window_and_cap_rules_hold() -> None:
    table = SeenTable(100, 3)
    for mid in range(5):
        table.put(("a", mid), mid, float(mid), 247.0)
    table.put(("b", 0), 10, 5.0, 145.0)
    assert [table.get(("a", mid)) for mid in range(5)] == [None, None, 2, 3, 4]  # a's oldest two went, early
    assert table.get(("b", 0)) == 10
    table.expire(151.0)  # b's NON expired: its window goes with it
    assert table.stats()["peers"] == 1 and len(table) == 3
    capped = SeenTable(4, 64)
    for n in range(40):  # many peers, one entry each: the cap, not the windows, bounds the table
        capped.put((f"peer-{n}", 1), n, float(n), 247.0)
    assert len(capped) == 4 and capped.stats()["peers"] == 4
    assert [capped.get((f"peer-{n}", 1)) for n in (35, 36, 39)] == [None, 36, 39]
    assert (capped.cap, capped.window) == (4, 64)


def test_keys_and_arguments_are_checked() -> None:
    table = SeenTable(10, 2)
    with pytest.raises(TypeError):
        table.get("not a pair")
    with pytest.raises(TypeError):
        table.put(("a", "1"), 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        table.put(("a", 0x10000), 1, 0.0, 1.0)
    with pytest.raises(TypeError):
        table.put(("a", 1), 1, "now", 1.0)
    with pytest.raises(ValueError):
        SeenTable(0, 1)
    with pytest.raises(TypeError):
        table.get((["unhashable"], 1))
    assert len(table) == 0


class Value:
    pass


def test_values_are_released_when_they_leave_and_cycles_through_the_table_are_collected() -> None:
    table = SeenTable(2, 2)
    first, second, third = Value(), Value(), Value()
    refs = [weakref.ref(v) for v in (first, second, third)]
    table.put(("a", 1), first, 0.0, 10.0)
    table.put(("a", 2), second, 0.0, 10.0)
    table.put(("a", 3), third, 0.0, 10.0)  # the window of 2: the first goes
    del first, second, third
    assert [r() is None for r in refs] == [True, False, False]
    table.replace(("a", 2), refs[1](), "answered")
    assert refs[1]() is None and table.get(("a", 2)) == "answered"
    table.expire(10.0)
    assert refs[2]() is None and len(table) == 0
    looped = Value()
    looped.table = SeenTable(4, 4)  # type: ignore[attr-defined]
    looped.table.put(("a", 1), looped, 0.0, 10.0)  # type: ignore[attr-defined]
    ref = weakref.ref(looped)
    del looped
    gc.collect()
    assert ref() is None


def test_a_value_freed_on_its_way_out_may_use_the_table() -> None:
    """A value's deallocation runs code: the table is consistent by then (counts first, then the value)."""
    table = SeenTable(10, 1)
    seen: list[int] = []

    class Reentrant:
        def __del__(self) -> None:
            seen.append(len(table))
            table.put(("b", 1), "from __del__", 1.0, 99.0)

    table.put(("a", 1), Reentrant(), 0.0, 5.0)
    table.put(("a", 2), "newer", 0.0, 5.0)  # the window of 1 lets the first go
    assert seen == [0] and table.get(("b", 1)) == "from __del__" and table.get(("a", 2)) == "newer"
    table.put(("c", 1), Reentrant(), 0.0, 5.0)
    table.expire(6.0)  # expiry frees it: the new lifetime's queue comes in mid-expiry
    assert seen == [0, 1] and len(table) == 1 and table.get(("b", 1)) == "from __del__"


def test_no_reference_is_leaked() -> None:
    value = Value()
    before = sys.getrefcount(value)
    table = SeenTable(50, 4)
    for n in range(200):
        table.put((PEERS[n % 3], n % 7), value, float(n), LIFETIMES[n % 2])
        if n % 5 == 0:
            table.pop((PEERS[n % 3], n % 7))
        if n % 11 == 0:
            table.replace((PEERS[n % 3], (n + 1) % 7), value, value)
    assert sys.getrefcount(value) == before + len(table)
    table.expire(1e9)
    assert sys.getrefcount(value) == before and len(table) == 0
    del table
    assert sys.getrefcount(value) == before


def test_drop_front_pops_only_the_answered_front_of_the_piggyback_queue() -> None:
    """Endpoint.get_timer's loop in C: the front leaves while it is not pending, and nothing behind it."""
    from collections import deque
    from types import SimpleNamespace

    queue = deque(SimpleNamespace(state=s) for s in (2, 1, 0, 2, 0))
    _speedups.drop_front(queue, "state", 0)
    assert [e.state for e in queue] == [0, 2, 0]
    _speedups.drop_front(queue, "state", 0)  # a pending front: nothing goes
    assert len(queue) == 3
    empty: deque[Any] = deque()
    _speedups.drop_front(empty, "state", 0)
    with pytest.raises(AttributeError):
        _speedups.drop_front(deque([object()]), "state", 0)
    with pytest.raises(TypeError):
        _speedups.drop_front(queue, 1, 0)
