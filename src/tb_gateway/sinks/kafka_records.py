"""The Kafka record format, schema 1 (docs/kafka-records.md is its specification; keep the two in step).

Pure functions, no Kafka client: the sink uses them to build records, tests and consumers to check them.

- key: the device id (UTF-8), so every record of a device lands in one partition, in order;
- value: one JSON object (``encode_value``);
- headers: ``tb-schema``, ``tb-kind``, ``tb-transport``, ``tb-msg-id`` (routing without parsing the value).

``msg_id`` is a hash of the record's content (device id, kind, ts, received_at, transport, values), so a
record sent twice (after a failed delivery, or replayed from the spool) carries the same id both times and
a consumer can drop the copy; no counter has to survive a crash for that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from tb_gateway.records import Record, RecordKind

SCHEMA_VERSION = 1
FIELDS = (
    "schema",
    "msg_id",
    "device",
    "device_id",
    "device_type",
    "kind",
    "ts",
    "values",
    "transport",
    "received_at",
)
HEADERS = ("tb-schema", "tb-kind", "tb-transport", "tb-msg-id")


def message_id(record: Record) -> str:
    """32 hex digits, the same for every copy of one record; content-addressed, so it survives restarts."""
    content = orjson.dumps(
        [
            record.device.id,
            record.kind.value,
            record.ts,
            record.received_at,
            record.transport.value,
            record.values,
        ]
    )
    return hashlib.blake2b(content, digest_size=16).hexdigest()


def encode(record: Record) -> tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]:
    """``(key, value, headers)`` of the Kafka record for ``record``."""
    msg_id = message_id(record)
    value = orjson.dumps({"schema": SCHEMA_VERSION, "msg_id": msg_id, **record.to_dict()})
    headers: list[tuple[str, str | bytes | None]] = [
        ("tb-schema", b"1"),
        ("tb-kind", record.kind.value.encode()),
        ("tb-transport", record.transport.value.encode()),
        ("tb-msg-id", msg_id.encode()),
    ]
    return record.device.id.encode(), value, headers


def topic_for(topics: Mapping[RecordKind, str], record: Record) -> str:
    return topics[record.kind]


def check(key: bytes, value: bytes, headers: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    """Decode a consumed record and check it against schema 1; return the value or raise ``ValueError``."""
    data = orjson.loads(value)
    if not isinstance(data, dict):
        raise ValueError("value is not a JSON object")
    if tuple(data) != FIELDS:
        raise ValueError(f"fields {tuple(data)} are not {FIELDS}")
    types: dict[str, type | tuple[type, ...]] = {
        "schema": int,
        "msg_id": str,
        "device": str,
        "device_id": str,
        "device_type": str,
        "kind": str,
        "ts": int,
        "values": dict,
        "transport": str,
        "received_at": int,
    }
    for name, expected in types.items():
        if not isinstance(data[name], expected) or isinstance(data[name], bool):
            raise ValueError(f"{name} is {type(data[name]).__name__}, not {expected}")
    if data["schema"] != SCHEMA_VERSION:
        raise ValueError(f"schema {data['schema']} is not {SCHEMA_VERSION}")
    if len(data["msg_id"]) != 32 or any(c not in "0123456789abcdef" for c in data["msg_id"]):
        raise ValueError("msg_id is not 32 lower-case hex digits")
    if data["kind"] not in {k.value for k in RecordKind}:
        raise ValueError(f"kind {data['kind']!r} is unknown")
    if key != data["device_id"].encode():
        raise ValueError("key is not the device id")
    expected_headers = {
        "tb-schema": str(SCHEMA_VERSION).encode(),
        "tb-kind": data["kind"].encode(),
        "tb-transport": data["transport"].encode(),
        "tb-msg-id": data["msg_id"].encode(),
    }
    if dict(headers or []) != expected_headers or len(headers or []) != len(HEADERS):
        raise ValueError(f"headers {headers} are not {expected_headers}")
    return data
