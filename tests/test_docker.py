"""No Docker engine runs in CI, so the image cannot be built here; these checks keep the Dockerfile and the
compose file honest: the image installs with the Makefile's step (the one `make run` and `make test` run),
and the compose file parses, names its three services and configures the gateway with real settings."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tb_gateway.config import Settings, load_settings

ROOT = Path(__file__).parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def make_prerequisites(target: str) -> list[str]:
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(f"{target}:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"no {target} target in the Makefile")


def test_dockerfile_installs_with_the_makefile_step() -> None:
    runs = [args for op, args in instructions() if op == "RUN"]
    installs = [args for args in runs if args.startswith("make ")]
    assert installs == ["make install PYTHON=python3"]
    assert not any("pip install" in args for args in runs)  # no second, diverging install path
    assert make_prerequisites("install") == ["$(STAMP)"]
    assert "$(STAMP)" in make_prerequisites("run")  # `make run` installs exactly what the image installs
    copied = {part for op, args in instructions() if op == "COPY" for part in args.split()[:-1]}
    assert {"pyproject.toml", "setup.py", "Makefile", "README.md", "src"} <= copied  # what pip needs to build it
    assert all((ROOT / path).exists() for path in copied)
    assert ("CMD", '["run"]') in instructions()


def test_dockerfile_exposes_the_default_ports() -> None:
    exposed = {args for op, args in instructions() if op == "EXPOSE"}
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    ports = f"{defaults.mqtt_bind_port} {defaults.http_bind_port} {defaults.coap_bind_port}/udp {defaults.metrics_port}"
    assert exposed == {ports}


def test_compose_file_runs_gateway_kafka_in_kraft_mode_and_redis() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "kafka", "redis"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft: no ZooKeeper anywhere
    assert not any("zookeeper" in str(value).lower() for value in kafka.values())
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert set(gateway["depends_on"]) == {"kafka", "redis"}
    env = gateway["environment"]
    settings = load_settings(_env_file=None, **{name.lower(): value for name, value in env.items()})
    assert settings.kafka_enabled and settings.kafka_bootstrap_servers == ["kafka:9092"]
    assert settings.redis_url == "redis://redis:6379/0" and settings.workers == 2
    assert set(gateway["ports"]) == {"1883:1883", "8081:8081", "5683:5683/udp", "9090:9090"}
