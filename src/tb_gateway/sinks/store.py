"""The embedded store: the sink when there is no backend (DATA_DIR/messages.db, SQLite in WAL mode).

Each batch is one transaction committed with ``synchronous=FULL``, so the WAL is fsynced before
``deliver`` returns and an acknowledged record survives ``kill -9`` and power loss. One writer thread does
the blocking work; batches queue up behind it, which is what makes them grow under load (the pipeline's
natural batching), so one fsync is paid per batch, not per record.

``read_messages`` is the reader side used by ``tb-gateway messages``; WAL lets it run next to the gateway.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from tb_gateway.errors import RetriableSinkError
from tb_gateway.records import Record
from tb_gateway.sinks.base import Outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    device      TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    device_type TEXT NOT NULL,
    kind        TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    vals        BLOB NOT NULL,
    transport   TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_device ON messages (device, seq);
"""


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


class StoreSink:
    name = "embedded"
    max_in_flight = 1

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._last_error: str | None = None
        self.stored = 0

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._writer, _connect, self._path)

    async def run(self) -> None:
        """No background work: every batch is written by ``deliver``."""

    async def deliver(self, batch: Sequence[Record]) -> Sequence[Outcome]:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._write, batch)
        except sqlite3.Error as exc:  # disk full, I/O error: nothing was committed
            self._last_error = str(exc)
            raise RetriableSinkError(f"embedded store write failed: {exc}") from exc
        self._last_error = None
        self.stored += len(batch)
        return [Outcome.DELIVERED] * len(batch)

    def _write(self, batch: Sequence[Record]) -> None:
        assert self._db is not None, "start() first"
        rows = [
            (
                r.device.name,
                r.device.id,
                r.device.type,
                r.kind.value,
                r.ts,
                orjson.dumps(r.values),
                r.transport.value,
                r.received_at,
            )
            for r in batch
        ]
        with self._db:  # one transaction, committed (and fsynced) on exit
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO messages (device, device_id, device_type, kind, ts, vals, transport, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._db is not None:
            await loop.run_in_executor(self._writer, self._db.close)
            self._db = None
        self._writer.shutdown(wait=True)

    def health(self) -> dict[str, Any]:
        status = "down" if self._db is None or self._last_error else "up"
        detail: dict[str, Any] = {"status": status, "kind": self.name, "path": str(self._path)}
        if self._last_error:
            detail["error"] = self._last_error
        return detail


def read_messages(path: Path, *, after_seq: int = 0, device: str | None = None) -> Iterator[dict[str, Any]]:
    """Stored records in arrival order, as documented dicts (docs/records.md) plus their ``seq``."""
    if not path.exists():
        return
    db = _connect(path, readonly=True)
    try:
        query = (
            "SELECT seq, device, device_id, device_type, kind, ts, vals, transport, received_at"
            " FROM messages WHERE seq > ?"
        )
        args: list[Any] = [after_seq]
        if device is not None:
            query += " AND device = ?"
            args.append(device)
        for seq, name, device_id, device_type, kind, ts, vals, transport, received_at in db.execute(
            query + " ORDER BY seq", args
        ):
            yield {
                "seq": seq,
                "device": name,
                "device_id": device_id,
                "device_type": device_type,
                "kind": kind,
                "ts": ts,
                "values": orjson.loads(vals),
                "transport": transport,
                "received_at": received_at,
            }
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
    finally:
        db.close()
