"""Client-side RPC (device -> backend), sans-IO: correlation ids, deadlines, replies matched to requests.

A device's request becomes an ``rpc_request`` record carrying a correlation ``id`` that is unique across
gateway processes and restarts (``<instance>-<n>``; docs/downlink.md says how a reply finds the worker
from it). The backend answers with that id; the answer goes back to the device (MQTT response topic, HTTP
response body, CoAP response). Without an answer in time the device gets ``{"error":"timeout"}`` (spec §1.9).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from tb_gateway.errors import PayloadError

TIMEOUT_REPLY: dict[str, Any] = {"error": "timeout"}


@dataclass(frozen=True, slots=True)
class ClientRpcRequest:
    id: str
    device_id: str
    method: str
    params: Any
    deadline: int  # epoch ms

    def values(self) -> dict[str, Any]:
        """The record's ``values`` (docs/kafka-records.md, "Client-side RPC request")."""
        return {"id": self.id, "method": self.method, "params": self.params}


class ClientRpcTable:
    def __init__(self, instance: str, *, timeout_ms: int, max_pending: int) -> None:
        self._instance = instance
        self._prefix = f"{instance}-"
        self._timeout_ms = timeout_ms
        self._max_pending = max_pending
        self._counter = 0
        self._pending: dict[str, ClientRpcRequest] = {}
        self._deadlines: list[tuple[int, str]] = []

    def owns(self, request_id: str) -> bool:
        """Whether this table made the id (``<instance>-<n>``): replies for another process are not ours."""
        return request_id.startswith(self._prefix)

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, device_id: str, method: str, params: Any, now: int) -> ClientRpcRequest | None:
        """A new request, or ``None`` when too many are waiting already."""
        if len(self._pending) >= self._max_pending:
            return None
        self._counter += 1
        request = ClientRpcRequest(
            f"{self._instance}-{self._counter}", device_id, method, params, now + self._timeout_ms
        )
        self._pending[request.id] = request
        heapq.heappush(self._deadlines, (request.deadline, request.id))
        return request

    def reply(self, request_id: str, device_id: str | None = None) -> ClientRpcRequest | None:
        """The request this reply answers (removed), or ``None`` if unknown, answered, timed out or for
        another device."""
        request = self._pending.get(request_id)
        if request is None or (device_id is not None and device_id != request.device_id):
            return None
        del self._pending[request_id]
        return request

    def cancel(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def next_deadline(self) -> int | None:
        while self._deadlines:
            deadline, request_id = self._deadlines[0]
            if request_id in self._pending:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def expire(self, now: int) -> list[ClientRpcRequest]:
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            request = self._pending.pop(request_id, None)
            if request is not None:
                expired.append(request)
        return expired


def parse_request(body: Any) -> tuple[str, Any]:
    """``{"method": "m", "params": ...}`` -> (method, params); ``params`` may be any JSON, missing -> null."""
    if not isinstance(body, dict):
        raise PayloadError("RPC request: expected a JSON object")
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise PayloadError("RPC request: 'method' must be a non-empty string")
    return method, body.get("params")
