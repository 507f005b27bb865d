"""The gateway's error tree.

::

    GatewayError
    ├── ConfigError              bad settings; start-up stops with one line per problem
    ├── RegistryError            device registry refused a change (duplicate name or token, unknown device)
    ├── PayloadError             a device payload has the wrong syntax or shape (-> 400 / 4.00 / PUBACK 0x99)
    ├── CredentialsUnavailable   a credential source cannot answer now; not cached (-> 503 / 5.03 / 0x03)
    ├── AddressBlocked           too many wrong credentials from this address (blocklist.py)
    └── SinkError                a sink could not make a batch durable
        ├── RetriableSinkError   the backend is down or slow; the records may be retried or spooled
        └── PermanentSinkError   the backend will never take these records (too large, ...)

Protocol errors from a peer never cross into the pipeline: each protocol core turns them into a wire reply
and a terminated state. A refused record is data (``pipeline.Refusal``), answered and counted, not raised.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RegistryError(GatewayError):
    """A registry change was refused; the message is meant for the operator."""


class PayloadError(GatewayError):
    """A device payload could not be normalized; the message says what is wrong and where."""


class CredentialsUnavailable(GatewayError):
    """A credential source could not say yes or no (backend down or answering oddly): refuse, retry later."""


class AddressBlocked(GatewayError):
    """The peer's address is blocked for repeated wrong credentials; nothing was looked up."""

    def __init__(self, address: str, retry_after_s: float) -> None:
        super().__init__(f"address {address} blocked for {retry_after_s:.0f} s after repeated wrong credentials")
        self.address = address
        self.retry_after_s = retry_after_s


class SinkError(GatewayError):
    retriable: bool = True


class RetriableSinkError(SinkError):
    retriable = True


class PermanentSinkError(SinkError):
    retriable = False
