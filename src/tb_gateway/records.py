"""The one record type that flows from every transport through the pipeline into every sink.

A device message becomes one ``Record`` per timestamp group (ThingsBoard makes one rule-engine message per
distinct ``ts``), so a sink never has to understand payload shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RecordKind(enum.StrEnum):
    TELEMETRY = "telemetry"
    ATTRIBUTES = "attributes"
    CLAIM = "claim"
    RPC_REQUEST = "rpc_request"  # client-side RPC: a device asks the backend (downlink/client_rpc.py)
    RPC_RESPONSE = "rpc_response"  # server-side RPC: the device's reply and every outcome (downlink/rpc.py)
    DEVICE_STATE = "device_state"  # connect / disconnect / activity / inactivity (downlink/device_state.py)


class Transport(enum.StrEnum):
    HTTP = "http"
    MQTT = "mqtt"
    COAP = "coap"
    GATEWAY = "gateway"  # made by the gateway itself, no transport carried it (an RPC that expired unsent)


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device is once authenticated; ``id`` is stable and is the Kafka key."""

    id: str
    name: str
    type: str = "default"
    token: str = field(default="", repr=False)

    def __hash__(self) -> int:  # equal identities share the id; hashing one string is a third of the cost
        return hash(self.id)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs per record on the hot path; never mutate one
class Record:
    device: DeviceIdentity
    kind: RecordKind
    ts: int  # epoch milliseconds: the device's own, or server time when it sent none
    values: dict[str, Any]
    transport: Transport
    received_at: int  # epoch milliseconds at the gateway

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON form (docs/records.md), shared by the embedded store and the CLI."""
        return {
            "device": self.device.name,
            "device_id": self.device.id,
            "device_type": self.device.type,
            "kind": self.kind.value,
            "ts": self.ts,
            "values": self.values,
            "transport": self.transport.value,
            "received_at": self.received_at,
        }
