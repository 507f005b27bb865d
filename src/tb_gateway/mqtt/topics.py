"""ThingsBoard's MQTT device topics (spec §1.3-§1.10, §1.13) as tables, and the small parsers they need.

A PUBLISH topic maps to a ``Target``: what to do with the message and, for requests, the topic family the
answer goes to (a v1 request is answered on v1, ``v2/a/req/j/5`` on ``v2/a/res/j/5``). Fixed topics are one
dict lookup; ``.../{id}`` topics are split once at the last ``/``.

``/p`` (protobuf) forms exist in ThingsBoard but this gateway speaks JSON only: their messages are refused
as an invalid payload (MQTT 5 PUBACK 0x99, 3.x close) rather than acknowledged and dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from tb_gateway.errors import PayloadError
from tb_gateway.mqtt.packets import ConnackV3, Connect, Reason
from tb_gateway.normalize import key_list, parse_json
from tb_gateway.records import RecordKind


class Action(enum.Enum):
    POST = "post"  # telemetry, attributes, claim: through the pipeline, PUBACK once durable
    ATTRIBUTE_REQUEST = "attribute_request"
    CLIENT_RPC = "client_rpc"
    RPC_RESPONSE = "rpc_response"  # reply to a server-side RPC (routed by the downlink issue)
    PROTOBUF = "protobuf"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Target:
    action: Action
    kind: RecordKind | None = None  # for POST
    request_id: int = 0
    response_prefix: str = ""  # answer topic = response_prefix + request id


UNKNOWN = Target(Action.UNKNOWN)
PROTOBUF = Target(Action.PROTOBUF)
_TELEMETRY = Target(Action.POST, RecordKind.TELEMETRY)
_ATTRIBUTES = Target(Action.POST, RecordKind.ATTRIBUTES)

FIXED: dict[str, Target] = {
    "v1/devices/me/telemetry": _TELEMETRY,
    "v2/t": _TELEMETRY,
    "v2/t/j": _TELEMETRY,
    "v2/t/p": PROTOBUF,
    "v1/devices/me/attributes": _ATTRIBUTES,
    "v2/a": _ATTRIBUTES,
    "v2/a/j": _ATTRIBUTES,
    "v2/a/p": PROTOBUF,
    "v1/devices/me/claim": Target(Action.POST, RecordKind.CLAIM),
}

# ".../{id}" topics: prefix -> (action, answer prefix)
WITH_ID: dict[str, tuple[Action, str]] = {
    "v1/devices/me/attributes/request": (Action.ATTRIBUTE_REQUEST, "v1/devices/me/attributes/response/"),
    "v2/a/req": (Action.ATTRIBUTE_REQUEST, "v2/a/res/"),
    "v2/a/req/j": (Action.ATTRIBUTE_REQUEST, "v2/a/res/j/"),
    "v2/a/req/p": (Action.PROTOBUF, ""),
    "v1/devices/me/rpc/request": (Action.CLIENT_RPC, "v1/devices/me/rpc/response/"),
    "v2/r/req": (Action.CLIENT_RPC, "v2/r/res/"),
    "v2/r/req/j": (Action.CLIENT_RPC, "v2/r/res/j/"),
    "v2/r/req/p": (Action.PROTOBUF, ""),
    "v1/devices/me/rpc/response": (Action.RPC_RESPONSE, ""),
    "v2/r/res": (Action.RPC_RESPONSE, ""),
    "v2/r/res/j": (Action.RPC_RESPONSE, ""),
    "v2/r/res/p": (Action.RPC_RESPONSE, ""),
}

MAX_REQUEST_ID = 2**31 - 1  # ThingsBoard parses request ids as Java ints


def route(topic: str, max_topic_length: int) -> Target:
    target = FIXED.get(topic)
    if target is not None:
        return target
    if len(topic) > max_topic_length:
        return UNKNOWN
    prefix, _, last = topic.rpartition("/")
    entry = WITH_ID.get(prefix)
    if entry is None:
        return UNKNOWN
    action, answer = entry
    if action is Action.PROTOBUF:
        return PROTOBUF
    if not (last.isascii() and last.isdigit()) or int(last) > MAX_REQUEST_ID:
        return Target(action, None, -1, answer)  # a bad id is a bad request: invalid-payload handling
    return Target(action, None, int(last), answer)


# SUBSCRIBE filters, exact strings (spec §1.3, §1.13): real subscriptions and bookkeeping-only ones alike.
ACCEPTED_FILTERS = frozenset(
    {
        "v1/devices/me/attributes",
        "v1/devices/me/rpc/request/+",
        "v1/devices/me/attributes/response/+",
        "v1/devices/me/rpc/response/+",
        "v2/a",
        "v2/a/j",
        "v2/a/p",
        "v2/r/req/+",
        "v2/r/req/j/+",
        "v2/r/req/p/+",
        "v2/a/res/+",
        "v2/a/res/j/+",
        "v2/a/res/p/+",
        "v2/r/res/+",
        "v2/r/res/j/+",
        "v2/r/res/p/+",
        "v2/fw/response/+/chunk/+",
        "v2/fw/error",
        "v2/sw/response/+/chunk/+",
        "v2/sw/error",
        "v1/gateway/attributes",
        "v1/gateway/rpc",
        "v1/gateway/attributes/response",
    }
)


def accept_filter(topic_filter: str) -> bool:
    return topic_filter in ACCEPTED_FILTERS


def auth_refusal(connect: Connect, unavailable: bool = False) -> tuple[int, int]:
    """(3.x CONNACK code, MQTT 5 CONNACK code) for refused credentials, as ThingsBoard chooses (spec §1.2)."""
    if unavailable:
        return ConnackV3.SERVER_UNAVAILABLE, Reason.SERVER_UNAVAILABLE
    has_user, has_password = bool(connect.username), connect.password is not None
    if has_user or has_password:
        return ConnackV3.NOT_AUTHORIZED, Reason.BAD_USERNAME_OR_PASSWORD
    if connect.client_id.strip():
        return ConnackV3.IDENTIFIER_REJECTED, Reason.CLIENT_ID_NOT_VALID
    return ConnackV3.NOT_AUTHORIZED, Reason.NOT_AUTHORIZED


def attribute_request(payload: bytes) -> tuple[list[str] | None, list[str] | None]:
    """``{"clientKeys":"a,b","sharedKeys":"x"}`` -> key lists; an absent list means every key (spec §1.6)."""
    document = parse_json(payload)
    if not isinstance(document, dict):
        raise PayloadError("attribute request: expected a JSON object")
    return _keys(document, "clientKeys"), _keys(document, "sharedKeys")


def _keys(document: dict[str, Any], name: str) -> list[str] | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:  # Gson reads a one-element array as its element
        value = value[0]
    if isinstance(value, str):
        return key_list(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return key_list(str(value))
    raise PayloadError(f"attribute request: {name} must be a comma-separated string")


def client_rpc(payload: bytes) -> tuple[str, Any]:
    """``{"method": "m", "params": ...}`` -> (method, params); params default to null (spec §1.9)."""
    document = parse_json(payload)
    if not isinstance(document, dict) or not isinstance(document.get("method"), str):
        raise PayloadError('client-side RPC: expected {"method": "...", "params": ...}')
    return document["method"], document.get("params")
