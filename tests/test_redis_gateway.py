"""End to end with a real redis-server: two `tb-gateway run` instances share credentials, a `device remove`
reaches both, and a gateway whose Redis goes away keeps serving and says so in /health."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.harness.redis import RedisServer
from tests.mqtt_support import Client

pytestmark = pytest.mark.slow

TOKEN = "REDIS_SHARED_TOKEN"


def post(base_url: str, token: str = TOKEN) -> int:
    return httpx.post(f"{base_url}/api/v1/{token}/telemetry", json={"t": 1}, timeout=5).status_code


def wait_for(check: object, timeout_s: float) -> float:
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_two_instances_share_credentials_and_a_removal_reaches_both(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    common = {"redis_url": redis_server.url, "auth_negative_cache_ttl_seconds": "30"}
    a = gateway_factory("a", **common).start()
    b = gateway_factory("b", **common).start()  # its own DATA_DIR: its registry does not know the device
    a.add_device("shared-1", TOKEN)
    wait_for(lambda: post(a.base_url) == 200, 5.0)  # A's registry poll picks the device up
    assert post(b.base_url) == 200  # learned from Redis: B never saw the device added
    assert post(b.base_url, "UNKNOWN") == 401
    result = a.cli("device", "remove", "shared-1")
    assert "revoked on 2 gateway instance(s)" in result.stdout
    took = wait_for(lambda: post(b.base_url) == 401, 5.0)
    assert took < 1.0  # pub/sub: at once, not after the 1 h cache TTL
    assert post(a.base_url) == 401
    assert "revoked" in b.log()


def test_redis_down_health_degraded_devices_still_served(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = gateway_factory(redis_url=redis_server.url).start()
    gw.add_device("dev-1", TOKEN)
    wait_for(lambda: post(gw.base_url) == 200, 5.0)
    health = httpx.get(f"{gw.base_url}/health").json()
    assert health["status"] == "up" and health["components"]["redis"]["status"] == "up"
    redis_server.stop()
    wait_for(lambda: httpx.get(f"{gw.base_url}/health").json()["components"]["redis"]["status"] == "degraded", 5.0)
    response = httpx.get(f"{gw.base_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "degraded"
    assert post(gw.base_url) == 200  # the local cache answers
    metrics = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics").text
    assert "tb_gateway_redis_up 0.0" in metrics
    redis_server.start()
    wait_for(lambda: httpx.get(f"{gw.base_url}/health").json()["status"] == "up", 5.0)
    assert post(gw.base_url) == 200


def test_a_miss_cached_by_another_instance_does_not_hide_a_device_known_here(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    common = {"redis_url": redis_server.url, "auth_negative_cache_ttl_seconds": "3"}
    a = gateway_factory("a", **common).start()
    b = gateway_factory("b", **common).start()
    a.add_device("only-on-a", TOKEN)  # in A's registry only
    assert post(b.base_url) == 401  # B's registry does not know it: a miss, cached in Redis for 3 s
    assert post(a.base_url) == 200  # A still asks its own registry
    wait_for(lambda: post(b.base_url) == 200, 6.0)  # and B learns it from Redis once its own miss expires


def test_a_removal_missed_during_a_redis_outage_closes_the_session_when_redis_is_back(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    common = {"redis_url": redis_server.url}
    a = gateway_factory("a", **common).start()
    b = gateway_factory("b", **common).start()
    a.add_device("removed", TOKEN)
    b.add_device("kept-b", "REDIS_KEPT_B_TOKEN")
    assert post(a.base_url) == 200  # now in Redis: B learns it from there

    async def scenario() -> None:
        removed = await Client.open(b.mqtt_port, 5)
        assert (await removed.connect(username=TOKEN)).reason_code == 0
        kept = await Client.open(b.mqtt_port, 5)
        assert (await kept.connect(username="REDIS_KEPT_B_TOKEN")).reason_code == 0  # B's own registry
        redis_server.stop()
        await asyncio.sleep(0.5)
        assert "unreachable" in a.cli("device", "remove", "removed").stderr  # the revocation reaches nobody
        assert await removed.silent(1.5)  # B does not know yet
        redis_server.start()
        await removed.until_closed(5.0)  # Redis back: B re-checks its live sessions, as a revocation closes
        assert await kept.silent(1.0)
        again = await Client.open(b.mqtt_port, 5)
        assert (await again.connect(username=TOKEN)).reason_code != 0
        await again.close()
        await kept.close()

    asyncio.run(scenario())
    assert "device removed is no longer known after the Redis outage: closing its sessions" in b.log()
