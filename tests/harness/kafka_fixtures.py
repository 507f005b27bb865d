"""pytest fixtures for the real Kafka broker (registered by one import line in tests/conftest.py).

One broker per test session, started on first use. Fault tests stop and restart it on the same port and
log dir; ``kafka`` makes sure every test starts with it running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.kafka import KafkaBroker, fetch


@pytest.fixture(scope="session")
def kafka_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), libs=fetch())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka(kafka_session: KafkaBroker) -> KafkaBroker:
    """The session's broker, running."""
    return kafka_session.start()
