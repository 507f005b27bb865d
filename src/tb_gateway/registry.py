"""The embedded device registry: devices and their credentials in SQLite (DATA_DIR/registry.db).

Used by the ``tb-gateway device`` commands and, through ``RegistryCredentials``, by the gateway to resolve
access tokens and MQTT basic credentials (spec §1.2). The CLI and a running gateway share the file: SQLite
serialises the writes, and the gateway notices changes through ``data_version`` (see ``changed``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tb_gateway.auth import AccessToken, Credentials, MqttBasic
from tb_gateway.errors import RegistryError
from tb_gateway.records import DeviceIdentity
from tb_gateway.sqlite_files import open_wal

TOKEN_BYTES = 15  # 20 URL-safe characters, like ThingsBoard's generated access tokens
MAX_NAME_LENGTH = 255  # ThingsBoard's device name limit (device.name is varchar(255), checked by its validator)
# control characters (a newline or tab breaks `device list` and log lines), and line/paragraph separators
_CONTROL = frozenset(("Cc", "Zl", "Zp"))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL DEFAULT 'default',
    token      TEXT UNIQUE,
    client_id  TEXT,
    username   TEXT,
    password   TEXT,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_basic ON devices (coalesce(client_id, ''), coalesce(username, ''))
    WHERE client_id IS NOT NULL OR username IS NOT NULL;
"""


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str
    type: str
    token: str | None
    client_id: str | None
    username: str | None
    password: str | None
    created_at: int

    @property
    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(self.id, self.name, self.type, self.token or "")


_COLUMNS = "id, name, type, token, client_id, username, password, created_at"


class Registry:
    def __init__(self, path: Path) -> None:
        try:
            self._db = open_wal(path, synchronous="FULL")
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(_cannot_open(path, exc)) from None
        try:
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise RegistryError(_cannot_open(path, exc)) from None

    def add(
        self,
        name: str,
        *,
        token: str | None = None,
        device_type: str = "default",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> Device:
        """Register a device. With no credentials at all, a random access token is generated."""
        if not name.strip():
            raise RegistryError("device name must not be empty")
        if len(name) > MAX_NAME_LENGTH:
            raise RegistryError(f"device name must be at most {MAX_NAME_LENGTH} characters (got {len(name)})")
        checked = {"device name": name, "--type": device_type, "--client-id": client_id, "--username": username}
        for what, value in (checked | {"--token": token}).items():
            _refuse_control(what, value)
        basic = client_id is not None or username is not None
        if password is not None and not basic:
            raise RegistryError("--password needs --client-id and/or --username")
        if token is None and not basic:
            token = secrets.token_urlsafe(TOKEN_BYTES)
        if token is not None and (not token or "/" in token or any(c.isspace() for c in token)):
            raise RegistryError("token must be non-empty, without '/' or spaces (it is used in URLs)")
        self._refuse_duplicates(name, token, client_id, username)
        device = Device(
            str(uuid.uuid4()),
            name,
            device_type,
            token,
            client_id,
            username,
            password,
            int(time.time() * 1000),
        )
        try:
            self._db.execute(
                f"INSERT INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (device.id, name, device_type, token, client_id, username, password, device.created_at),
            )
        except sqlite3.IntegrityError as exc:  # lost a race with another writer
            raise RegistryError(f"device not added: {exc}") from None
        return device

    def _refuse_duplicates(self, name: str, token: str | None, client_id: str | None, username: str | None) -> None:
        if self._one("name = ?", name) is not None:
            raise RegistryError(f"a device named {name!r} already exists")
        if token is not None and self._one("token = ?", token) is not None:
            raise RegistryError("that access token is already used by another device")
        if (client_id is not None or username is not None) and self._basic(client_id, username) is not None:
            raise RegistryError("those MQTT basic credentials are already used by another device")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group many changes into one commit (one fsync): bulk registration, imports, benchmarks."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def remove(self, name: str) -> Device:
        device = self._one("name = ?", name)
        if device is None:
            raise RegistryError(f"no device named {name!r}")
        self._db.execute("DELETE FROM devices WHERE id = ?", (device.id,))
        return device

    def list(self) -> list[Device]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY name").fetchall()
        return [Device(*row) for row in rows]

    def by_name(self, name: str) -> Device | None:
        return self._one("name = ?", name)

    def by_token(self, token: str) -> Device | None:
        return self._one("token = ?", token)

    def _basic(self, client_id: str | None, username: str | None) -> Device | None:
        return self._one(
            "coalesce(client_id, '') = ? AND coalesce(username, '') = ? "
            "AND (client_id IS NOT NULL OR username IS NOT NULL)",
            client_id or "",
            username or "",
        )

    def _one(self, where: str, *args: str) -> Device | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM devices WHERE {where}", args).fetchone()
        return Device(*row) if row is not None else None

    def data_version(self) -> int:
        """Changes whenever another connection (the CLI) commits to the registry."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def resolve_basic(self, client_id: str, username: str, password: str) -> Device | None:
        """MQTT basic credentials, in ThingsBoard's order (spec §1.2)."""
        if not username:
            device = self._basic(client_id or None, None)
            return device if device is not None and _password_ok(device, password) else None
        device = self._basic(client_id or None, username)
        if device is not None:
            return device if _password_ok(device, password) else None
        # fallback: the username is an access token (password ignored) or a username-only credential
        token_device = self.by_token(username)
        if token_device is not None:
            return token_device
        device = self._basic(None, username)
        return device if device is not None and _password_ok(device, password) else None

    def close(self) -> None:
        self._db.close()


def _refuse_control(what: str, value: str | None) -> None:
    if value is not None and any(unicodedata.category(c) in _CONTROL for c in value):
        raise RegistryError(f"{what} must not contain control characters (newline, tab, ...): {value!r}")


def _cannot_open(path: Path, exc: Exception) -> str:
    reason = str(exc)
    directory = path.parent
    if directory.is_dir() and not os.access(directory, os.W_OK):
        reason += " (the directory is not writable)"
    return f"cannot open the device registry in DATA_DIR {directory}: {reason}"


def _password_ok(device: Device, password: str) -> bool:
    return not device.password or secrets.compare_digest(device.password, password)


class RegistryCredentials:
    """``CredentialSource`` over the embedded registry."""

    name = "registry"

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def lookup(self, credentials: Credentials) -> DeviceIdentity | None:
        if isinstance(credentials, AccessToken):
            device = self._registry.by_token(credentials.token)
        elif isinstance(credentials, MqttBasic):
            device = self._registry.resolve_basic(credentials.client_id, credentials.username, credentials.password)
        else:
            return None
        return device.identity if device is not None else None
