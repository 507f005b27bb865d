"""The gateway's attribute store: client attributes the devices posted, shared attributes from the backend.

Answers attribute requests on every transport (``{"client": {...}, "shared": {...}}``, spec §1.6 / §3).
Kept in memory for speed and written through to SQLite in DATA_DIR so a restart forgets nothing. Client
attributes are recorded only once the sink confirmed them durable, so a device never reads back a value
that was not acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from tb_gateway.sqlite_files import open_wal

CLIENT = "client"
SHARED = "shared"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attributes (
    device_id  TEXT NOT NULL,
    scope      TEXT NOT NULL CHECK (scope IN ('client', 'shared')),
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, scope, key)
) WITHOUT ROWID;
"""


# Scopes (device x client/shared) kept in memory: a fleet's worth would grow without end (~450 bytes each,
# a device with no attributes at all included); the oldest read goes first, and SQLite answers it again.
CACHE_MAX_SCOPES = 100_000


class AttributeStore:
    def __init__(self, path: Path, cache_max_scopes: int = CACHE_MAX_SCOPES) -> None:
        self._db = open_wal(path, synchronous="NORMAL")
        self._db.executescript(_SCHEMA)
        self._cache: dict[tuple[str, str], dict[str, Any]] = {}
        self._cache_max = cache_max_scopes

    def _scope(self, device_id: str, scope: str) -> dict[str, Any]:
        cached = self._cache.get((device_id, scope))
        if cached is None:
            rows = self._db.execute(
                "SELECT key, value FROM attributes WHERE device_id = ? AND scope = ?", (device_id, scope)
            )
            cached = {key: orjson.loads(value) for key, value in rows}
            if len(self._cache) >= self._cache_max:  # written through to SQLite: dropping loses nothing
                del self._cache[next(iter(self._cache))]
            self._cache[(device_id, scope)] = cached
        return cached

    def get(self, device_id: str, scope: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
        values = self._scope(device_id, scope)
        if keys is None:
            return dict(values)
        return {key: values[key] for key in keys if key in values}

    def request(self, device_id: str, client_keys: list[str] | None, shared_keys: list[str] | None) -> dict[str, Any]:
        """ThingsBoard's attribute response: neither list given -> everything; a section is omitted if empty."""
        if client_keys is None and shared_keys is None:
            client, shared = self.get(device_id, CLIENT), self.get(device_id, SHARED)
        else:
            client = self.get(device_id, CLIENT, client_keys) if client_keys is not None else {}
            shared = self.get(device_id, SHARED, shared_keys) if shared_keys is not None else {}
        response: dict[str, Any] = {}
        if client:
            response[CLIENT] = client
        if shared:
            response[SHARED] = shared
        return response

    def update(self, device_id: str, scope: str, values: dict[str, Any]) -> None:
        if not values:
            return
        now = int(time.time() * 1000)
        self._db.executemany(
            "INSERT INTO attributes (device_id, scope, key, value, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id, scope, key) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at",
            [(device_id, scope, key, orjson.dumps(value), now) for key, value in values.items()],
        )
        self._scope(device_id, scope).update(values)

    def delete(self, device_id: str, scope: str, keys: Iterable[str]) -> list[str]:
        """Remove keys; returns those that existed."""
        current = self._scope(device_id, scope)
        gone = [key for key in keys if key in current]
        self._db.executemany(
            "DELETE FROM attributes WHERE device_id = ? AND scope = ? AND key = ?",
            [(device_id, scope, key) for key in gone],
        )
        for key in gone:
            del current[key]
        return gone

    def forget_device(self, device_id: str) -> None:
        self._db.execute("DELETE FROM attributes WHERE device_id = ?", (device_id,))
        self._cache.pop((device_id, CLIENT), None)
        self._cache.pop((device_id, SHARED), None)

    def close(self) -> None:
        self._db.close()
