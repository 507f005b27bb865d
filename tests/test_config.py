"""Settings: the seed's names and defaults, .env files, and one clear line per bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tb_gateway.config import Settings, load_settings
from tb_gateway.errors import ConfigError

SEED_DEFAULTS = {
    "tb_host": "localhost",
    "tb_port": 8080,
    "tb_protocol": "http",
    "gateway_access_token": None,
    "mqtt_enabled": True,
    "mqtt_bind_address": "0.0.0.0",
    "mqtt_bind_port": 1883,
    "mqtt_ssl_enabled": False,
    "mqtt_max_connections": 10000,
    "http_enabled": True,
    "http_bind_address": "0.0.0.0",
    "http_bind_port": 8081,
    "coap_enabled": True,
    "coap_bind_address": "0.0.0.0",
    "coap_bind_port": 5683,
    "kafka_enabled": True,
    "kafka_bootstrap_servers": ["localhost:9092"],
    "kafka_topic_telemetry": "tb.telemetry",
    "kafka_topic_attributes": "tb.attributes",
    "batch_size": 100,
    "batch_timeout": 1.0,
    "max_payload_size": 65536,
    "rate_limit_requests_per_second": 100,
    "log_level": "INFO",
    "data_dir": Path("./data"),
    "metrics_port": 9090,
    "log_format": "json",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [*SEED_DEFAULTS, "batch_size"]:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_seed_defaults() -> None:
    settings = Settings()
    for name, default in SEED_DEFAULTS.items():
        assert getattr(settings, name) == default, name


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BATCH_SIZE=7\nLOG_FORMAT=text\nKAFKA_BOOTSTRAP_SERVERS=a:1, b:2\n")
    monkeypatch.setenv("BATCH_SIZE", "9")  # the environment wins over .env
    settings = load_settings()
    assert settings.batch_size == 9
    assert settings.log_format == "text"
    assert settings.kafka_bootstrap_servers == ["a:1", "b:2"]


def test_seed_json_list_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", '["k1:9092","k2:9092"]')
    assert load_settings().kafka_bootstrap_servers == ["k1:9092", "k2:9092"]


def test_every_problem_named_on_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "0")
    monkeypatch.setenv("HTTP_BIND_PORT", "70000")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    monkeypatch.setenv("MQTT_ENABLED", "perhaps")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    problems = caught.value.problems
    assert len(problems) == 4
    assert {p.split(":")[0] for p in problems} == {
        "BATCH_SIZE",
        "HTTP_BIND_PORT",
        "LOG_FORMAT",
        "MQTT_ENABLED",
    }
    assert any("'70000'" in p for p in problems)


def test_bad_configuration_stops_start_up_with_one_line_per_problem(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "BATCH_TIMEOUT": "-1", "TB_PROTOCOL": "gopher", "DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "tb_gateway", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("configuration error: ")
    assert {line.split(": ")[1] for line in lines} == {"BATCH_TIMEOUT", "TB_PROTOCOL"}


def test_configuration_doc_lists_every_setting() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in doc]
    assert missing == []
