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


FLOAT_SETTINGS = sorted(name.upper() for name, field in Settings.model_fields.items() if field.annotation is float)


def test_every_float_setting_is_checked_below() -> None:
    assert "RPC_MAX_TIMEOUT_SECONDS" in FLOAT_SETTINGS and "STORE_RETENTION_HOURS" in FLOAT_SETTINGS
    assert len(FLOAT_SETTINGS) >= 17  # every float field is found (none hides behind another annotation)


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_float_settings_refuse_non_finite_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """No float setting means "no limit" by infinity (those that have one spell it 0): inf crashed start-up."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}: ")
    assert "finite" in problem or value == "-inf"  # -inf: "greater than 0" comes first where there is a bound


@pytest.mark.parametrize(
    "name", ["RPC_MAX_TIMEOUT_SECONDS", "RPC_DEFAULT_TIMEOUT_SECONDS", "HTTP_IDLE_TIMEOUT_SECONDS"]
)
def test_a_duration_beyond_ten_years_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """1e306 was finite, so accepted, and an RPC's expiry in milliseconds then overflowed."""
    monkeypatch.setenv(name, "1e306")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}: ") and "315360000" in problem
    monkeypatch.setenv(name, "315360000")
    assert getattr(load_settings(), name.lower()) == 315_360_000.0


def test_infinite_rpc_timeout_stops_start_up_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "RPC_MAX_TIMEOUT_SECONDS": "inf", "DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "tb_gateway", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "configuration error: RPC_MAX_TIMEOUT_SECONDS: Input should be a finite number (got 'inf')"
    ]


@pytest.mark.parametrize("servers", ["", " , ", "[]"])
def test_kafka_needs_a_broker_when_enabled(monkeypatch: pytest.MonkeyPatch, servers: str) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers)
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka_enabled=True)
    [problem] = caught.value.problems
    assert problem.startswith("KAFKA_BOOTSTRAP_SERVERS: ") and "at least one broker" in problem
    assert load_settings(kafka_enabled=False).kafka_bootstrap_servers == []  # unused then: no broker needed


@pytest.mark.parametrize("servers", ['{"a":1}', "kafka", "kafka:", ":9092", "kafka:0", "kafka:65536", "a b:1", "a:1,b"])
def test_kafka_brokers_must_be_host_port(monkeypatch: pytest.MonkeyPatch, servers: str) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", servers)
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka_enabled=False)  # a malformed value is refused whether or not Kafka is on
    [problem] = caught.value.problems
    assert problem.startswith("KAFKA_BOOTSTRAP_SERVERS: ") and "expected host:port" in problem


def test_kafka_broker_forms_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1.example.com:9092, 10.0.0.7:19092,[::1]:9092")
    assert load_settings().kafka_bootstrap_servers == ["kafka-1.example.com:9092", "10.0.0.7:19092", "[::1]:9092"]


def test_dotenv_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"BATCH_SIZE=7\nTB_HOST=caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith(f"{tmp_path / '.env'}: not UTF-8 text (line 2: ")


@pytest.mark.parametrize("url", ["notaurl", "http://redis:6379", "redis:6379"])
def test_redis_url_needs_a_redis_scheme(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """It was taken as is, and the Redis client's ValueError stopped start-up with a traceback."""
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith("REDIS_URL: ") and "redis://" in problem


@pytest.mark.parametrize("url", ["redis://redis:6379/0", "rediss://u:p@r:6380/1", "unix:///run/redis.sock"])
def test_redis_url_forms_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert load_settings().redis_url == url
    monkeypatch.setenv("REDIS_URL", " ")
    assert load_settings().redis_url is None
