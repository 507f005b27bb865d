"""Opening the gateway's SQLite files (registry, attributes) safely when several processes start at once.

Switching a database to WAL needs an exclusive lock, and SQLite answers "database is locked" at once (without
waiting for the busy timeout) when two connections try it together — as WORKERS=N workers starting side by
side do. The switch is retried for the busy timeout; once a file is in WAL mode it stays so and the pragma
takes no lock."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

RETRY_S = 0.02


def open_wal(path: Path, *, synchronous: str, timeout_s: float = 10.0) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                db.close()
                raise
            time.sleep(RETRY_S)
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db
