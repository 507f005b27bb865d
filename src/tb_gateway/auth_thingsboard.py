"""A ``CredentialSource`` that asks a ThingsBoard server whether an access token is valid.

``GET {base_url}/api/v1/{token}/attributes`` is the cheapest device-API call that checks a token without
writing anything: 200 means valid, 401 means unknown (spec §3: checked before anything else). Any other
answer, or none, raises ``CredentialsUnavailable``: the AuthService caches nothing for it and the
transport answers "try later" (HTTP 503, CoAP 5.03, MQTT CONNACK server unavailable) instead of calling a
good device invalid. Caching (1 hour for a valid token, seconds for an invalid one) is the AuthService's job.

The device API says nothing about the device itself, so the identity is made from the token alone:
``id = "tb:" + sha256(token)[:16 hex]`` — stable across restarts and instances (it is the Kafka key), and it
does not reveal the token; ``name`` is the same string, because a token prefix would leak part of a
credential into logs, the embedded store and Kafka.
"""

from __future__ import annotations

import hashlib

import aiohttp

from tb_gateway.auth import AccessToken, AuthService, Credentials
from tb_gateway.config import Settings
from tb_gateway.errors import CredentialsUnavailable
from tb_gateway.metrics import Metrics
from tb_gateway.records import DeviceIdentity
from tb_gateway.tb_client import call, device_url, open_session

# ThingsBoard generates 20-character tokens; a "token" longer than this is a guess or garbage, and is not
# worth a request (nor an over-long URL) to the backend.
MAX_TOKEN_CHARS = 256


def identity_for_token(token: str) -> DeviceIdentity:
    """The identity of a device known to ThingsBoard only by its token (see the module docstring)."""
    device_id = "tb:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return DeviceIdentity(id=device_id, name=device_id, token=token)


class ThingsBoardCredentialSource:
    """Validates access tokens against ThingsBoard; other credential kinds are not its to judge (``None``).

    MQTT basic credentials and X.509 fingerprints cannot be checked through the device HTTP API, so they
    are left to the other sources.
    """

    name = "thingsboard"
    remote = True  # shared by every instance: a miss cached in Redis answers for it too (auth.is_remote)

    def __init__(self, base_url: str, metrics: Metrics, *, timeout_s: float = 10.0, max_connections: int = 32) -> None:
        self.base_url = base_url
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> ThingsBoardCredentialSource:
        return cls(
            settings.tb_base_url,
            metrics,
            timeout_s=settings.tb_http_timeout_seconds,
            max_connections=settings.tb_http_max_connections,
        )

    async def start(self) -> None:
        if self._session is None:
            self._session = open_session(self._timeout_s, self._max_connections)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def lookup(self, credentials: Credentials) -> DeviceIdentity | None:
        if not isinstance(credentials, AccessToken):
            return None
        token = credentials.token
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        await self.start()
        assert self._session is not None
        answer = await call(self._session, "GET", device_url(self.base_url, token, "attributes"))
        if isinstance(answer, str):
            self._count("error")
            raise CredentialsUnavailable(f"ThingsBoard at {self.base_url} unreachable: {answer}")
        self._count(str(answer.status))
        verdict = _VERDICTS.get(answer.status)
        if verdict is None:
            raise CredentialsUnavailable(
                f"ThingsBoard at {self.base_url} answered a token check with HTTP {answer.status}"
            )
        return verdict(token)

    def _count(self, result: str) -> None:
        self._metrics.thingsboard_requests.labels(endpoint="auth", result=result).inc()


def _unknown(token: str) -> None:
    return None


_VERDICTS = {200: identity_for_token, 401: _unknown}


def forget_token(auth: AuthService, token: str) -> int:
    """The sink's ``on_token_rejected`` hook: drop every cached answer for a token ThingsBoard now refuses.

    Without it a device whose token was revoked would keep being accepted (and its records rejected) until
    its one-hour cache entry ran out; with it the device's next request is checked afresh.
    """
    return auth.invalidate(
        lambda credentials, identity: (
            credentials == AccessToken(token) or (identity is not None and identity.token == token)
        )
    )
