from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess
from tests.harness.kafka_fixtures import kafka, kafka_session  # noqa: F401  (real broker, one per session)
from tests.harness.redis import redis_server, redis_session  # noqa: F401  (real redis-server, one per session)

GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Make (not start) gateway processes with their own DATA_DIR and free ports; all killed at teardown."""
    made: list[GatewayProcess] = []

    def make(name: str = "gw", **overrides: str) -> GatewayProcess:
        process = GatewayProcess(tmp_path / name, {k.upper(): str(v) for k, v in overrides.items()})
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill9()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    """A running gateway on the embedded default."""
    return gateway_factory().start()
