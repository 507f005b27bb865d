"""Shared attributes from the backend: kept in the attribute store, pushed to the devices that subscribed.

The pushed message is ThingsBoard's (spec §1.7 / §3 / §4): ``{"k": v, ...}`` for updates, plus
``"deleted": [..]`` when keys were removed; both may appear in one message. Only keys that really existed
are reported deleted. Two update forms come from the backend (docs/downlink.md):

- *replace* ``{"values": {...}}``: the device's complete shared attributes. Keys absent are deleted. This
  is the form for a compacted topic keyed by device: the last record of a device is the whole truth.
- *patch* ``{"update": {...}, "delete": [..]}``: changes only (either part optional).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tb_gateway.attributes import SHARED, AttributeStore
from tb_gateway.downlink.sessions import Feature, SessionRegistry
from tb_gateway.errors import PayloadError


@dataclass(frozen=True, slots=True)
class SharedChange:
    """What the backend asked for; ``replace`` means keys not in ``update`` are deleted."""

    update: dict[str, Any]
    delete: tuple[str, ...] = ()
    replace: bool = False


def parse_change(document: Any) -> SharedChange:
    """A backend's update (Kafka value or admin body) -> ``SharedChange``; ``PayloadError`` if malformed.

    ``None`` (a Kafka tombstone) deletes every shared attribute of the device.
    """
    if document is None:
        return SharedChange({}, replace=True)
    if not isinstance(document, dict):
        raise PayloadError("shared attributes: expected a JSON object")
    if "values" in document:
        values = document["values"]
        if not isinstance(values, dict) or set(document) - {"values", "device_id"}:
            raise PayloadError("shared attributes: 'values' must be an object and come alone")
        return SharedChange(_no_nulls(values), replace=True)
    update = document.get("update", {})
    delete = document.get("delete", [])
    if not isinstance(update, dict):
        raise PayloadError("shared attributes: 'update' must be an object")
    if not isinstance(delete, list) or not all(isinstance(key, str) for key in delete):
        raise PayloadError("shared attributes: 'delete' must be a list of keys")
    if not update and not delete:
        raise PayloadError("shared attributes: expected 'values', or 'update' and/or 'delete'")
    return SharedChange(_no_nulls(update), tuple(delete))


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type: 1 -> true or 1 -> 1.0 is a change a device must hear of."""
    return type(a) is type(b) and bool(a == b)


def _no_nulls(values: dict[str, Any]) -> dict[str, Any]:
    """A null value is skipped, as ThingsBoard skips null attribute values (spec §5)."""
    return {key: value for key, value in values.items() if value is not None}


class SharedAttributes:
    def __init__(self, store: AttributeStore, sessions: SessionRegistry) -> None:
        self._store = store
        self._sessions = sessions

    def apply(self, device_id: str, change: SharedChange) -> tuple[dict[str, Any] | None, int]:
        """Store the change; push it to the subscribed sessions.

        Returns the message pushed (``None`` when nothing changed) and how many sessions it went to.
        """
        delete: Sequence[str] = change.delete
        update = change.update
        if change.replace:  # only what differs: a record read again (restart, rebalance) pushes nothing
            current = self._store.get(device_id, SHARED)
            delete = [key for key in current if key not in update]
            update = {
                key: value for key, value in update.items() if key not in current or not _same(current[key], value)
            }
        self._store.update(device_id, SHARED, update)
        gone = self._store.delete(device_id, SHARED, delete) if delete else []
        if not update and not gone:
            return None, 0
        message: dict[str, Any] = dict(update)
        if gone:
            message["deleted"] = gone
        subscribers = self._sessions.subscribers(device_id, Feature.ATTRIBUTES)
        for session in subscribers:
            session.push_attributes(message)
        return message, len(subscribers)

    def snapshot(self, device_id: str) -> dict[str, Any]:
        """Every current shared attribute, flat: the first CoAP notification (spec §4)."""
        return self._store.get(device_id, SHARED)
