"""Embedded store sink and attribute store: durable writes, reading back, failures reported as retriable."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tb_gateway.attributes import CLIENT, SHARED, AttributeStore
from tb_gateway.errors import RetriableSinkError
from tb_gateway.records import DeviceIdentity, Record, RecordKind, Transport
from tb_gateway.sinks.base import Outcome
from tb_gateway.sinks.store import StoreSink, read_messages

DEV = DeviceIdentity("id-1", "dev1", "meter")


def rec(ts: int, **values: object) -> Record:
    return Record(DEV, RecordKind.TELEMETRY, ts, dict(values), Transport.MQTT, 1000 + ts)


def test_delivered_batches_read_back_in_order_and_filtered(tmp_path: Path) -> None:
    path = tmp_path / "messages.db"

    async def main() -> None:
        sink = StoreSink(path)
        await sink.start()
        assert await sink.deliver([rec(1, t=1.5), rec(2, s="x", j={"a": [1]})]) == [Outcome.DELIVERED] * 2
        other = Record(DeviceIdentity("id-2", "dev2"), RecordKind.ATTRIBUTES, 3, {"fw": "1"}, Transport.HTTP, 5)
        await sink.deliver([other])
        assert sink.health()["status"] == "up"
        await sink.close()
        assert sink.health()["status"] == "down"

    asyncio.run(main())
    rows = list(read_messages(path))
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert rows[0] == {
        "seq": 1,
        "device": "dev1",
        "device_id": "id-1",
        "device_type": "meter",
        "kind": "telemetry",
        "ts": 1,
        "values": {"t": 1.5},
        "transport": "mqtt",
        "received_at": 1001,
    }
    assert rows[1]["values"] == {"s": "x", "j": {"a": [1]}}
    assert [r["device"] for r in read_messages(path, device="dev2")] == ["dev2"]
    assert [r["seq"] for r in read_messages(path, after_seq=2)] == [3]


def test_reading_a_store_that_does_not_exist_yet_yields_nothing(tmp_path: Path) -> None:
    assert list(read_messages(tmp_path / "none.db")) == []


def test_write_failure_is_retriable_and_reported_in_health(tmp_path: Path) -> None:
    async def main() -> None:
        sink = StoreSink(tmp_path / "m.db")
        await sink.start()
        assert sink._db is not None
        sink._db.execute("DROP TABLE messages")  # any sqlite error on write stands for a failing disk
        with pytest.raises(RetriableSinkError, match="embedded store write failed"):
            await sink.deliver([rec(1, a=1)])
        assert sink.health()["status"] == "down"
        await sink.close()

    asyncio.run(main())


def test_store_uses_wal_and_full_sync(tmp_path: Path) -> None:
    async def main() -> None:
        sink = StoreSink(tmp_path / "m.db")
        await sink.start()
        assert sink._db is not None
        assert sink._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sink._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync on every commit
        await sink.close()

    asyncio.run(main())


def test_attribute_store_answers_like_thingsboard_and_persists(tmp_path: Path) -> None:
    store = AttributeStore(tmp_path / "a.db")
    assert store.request("d", None, None) == {}
    store.update("d", CLIENT, {"fw": "1.0", "n": 3})
    store.update("d", SHARED, {"interval": 10, "mode": "eco"})
    assert store.request("d", None, None) == {
        "client": {"fw": "1.0", "n": 3},
        "shared": {"interval": 10, "mode": "eco"},
    }
    assert store.request("d", ["fw", "missing"], None) == {"client": {"fw": "1.0"}}
    assert store.request("d", None, ["mode"]) == {"shared": {"mode": "eco"}}
    assert store.request("d", ["missing"], ["missing"]) == {}
    assert store.delete("d", SHARED, ["mode", "ghost"]) == ["mode"]
    store.close()
    again = AttributeStore(tmp_path / "a.db")
    assert again.request("d", None, None) == {"client": {"fw": "1.0", "n": 3}, "shared": {"interval": 10}}
    again.forget_device("d")
    assert again.request("d", None, None) == {}
    assert sqlite3.connect(tmp_path / "a.db").execute("SELECT count(*) FROM attributes").fetchone()[0] == 0
