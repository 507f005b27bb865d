"""What the composition root asks of every transport server (HTTP, MQTT, CoAP, metrics).

Shutdown runs in order, each step bounded by a timeout: ``stop_accepting`` on every server, then ``drain``
(answer what was already admitted and close the sessions), then the pipeline flushes and the sink closes.
"""

from __future__ import annotations

from typing import Protocol


class Server(Protocol):
    name: str

    async def start(self) -> None:
        """Bind and begin serving; raise ``OSError`` if the address cannot be bound."""
        ...

    def stop_accepting(self) -> None:
        """Close the listening sockets; live sessions go on."""
        ...

    async def drain(self) -> None:
        """Answer every message already admitted, then close every session."""
        ...
