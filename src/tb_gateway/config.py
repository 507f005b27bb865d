"""All settings, read once at start-up from the environment and a ``.env`` file (docs/configuration.md).

The seed's variables keep their names and defaults; new ones follow the same style with the unit in the
name. A bad value stops start-up with one clear line per problem, naming the variable.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tb_gateway.errors import ConfigError


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class KafkaCompression(enum.StrEnum):
    NONE = "none"
    GZIP = "gzip"
    SNAPPY = "snappy"
    LZ4 = "lz4"
    ZSTD = "zstd"


class Protocol(enum.StrEnum):
    HTTP = "http"
    HTTPS = "https"


Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[int, Field(gt=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore", frozen=True
    )

    # --- backend connection (seed) ---
    tb_host: str = "localhost"
    tb_port: Port = 8080
    tb_protocol: Protocol = Protocol.HTTP
    gateway_access_token: str | None = None
    tb_http_enabled: bool = False  # forward to ThingsBoard's HTTP device API when Kafka is off
    tb_auth_enabled: bool | None = None  # check unknown tokens against ThingsBoard; unset = TB_HTTP_ENABLED
    tb_http_timeout_seconds: PositiveSeconds = 10.0  # per request; TB's own sync-session timeout is 10 s
    tb_http_max_retries: Annotated[int, Field(ge=0)] = 3  # retries per request; then the batch is spooled
    tb_http_retry_backoff_ms: Positive = 100  # first retry delay, doubled per attempt
    tb_http_retry_backoff_max_ms: Positive = 2000  # cap for one delay (and for a backend's Retry-After)
    tb_http_max_connections: Positive = 32  # keep-alive pool and concurrent requests to the backend

    # --- MQTT (seed + TLS and limits) ---
    mqtt_enabled: bool = True
    mqtt_bind_address: str = "0.0.0.0"
    mqtt_bind_port: Port = 1883
    mqtt_ssl_enabled: bool = False
    mqtt_ssl_bind_port: Port = 8883
    mqtt_ssl_cert_file: Path | None = None
    mqtt_ssl_key_file: Path | None = None
    mqtt_max_connections: Positive = 10000
    mqtt_max_inflight: Positive = 100  # PUBLISHes awaiting PUBACK per connection (reported by getSessionLimits)
    mqtt_max_topic_length: Positive = 1024
    mqtt_connect_timeout_seconds: PositiveSeconds = 10.0  # time allowed between accept and CONNECT

    # --- HTTP (seed + timeouts) ---
    http_enabled: bool = True
    http_bind_address: str = "0.0.0.0"
    http_bind_port: Port = 8081
    http_idle_timeout_seconds: PositiveSeconds = 60.0  # keep-alive connection with no request
    http_header_timeout_seconds: PositiveSeconds = 10.0  # slow-loris guard: whole head must arrive in this
    http_body_timeout_seconds: PositiveSeconds = 30.0  # whole body must arrive in this
    http_max_connections: Positive = 10000

    # --- CoAP (seed + timers) ---
    coap_enabled: bool = True
    coap_bind_address: str = "0.0.0.0"
    coap_bind_port: Port = 5683
    coap_piggyback_timeout_ms: Positive = 500  # ThingsBoard's COAP_PIGGYBACK_TIMEOUT

    # --- Kafka (seed) ---
    kafka_enabled: bool = True
    kafka_bootstrap_servers: Annotated[list[str], NoDecode] = ["localhost:9092"]
    kafka_topic_telemetry: str = "tb.telemetry"
    kafka_topic_attributes: str = "tb.attributes"
    kafka_topic_device_events: str = "tb.device-events"  # claim requests and device state events
    kafka_topic_rpc_requests: str = "tb.rpc.requests"  # client-side RPC requests (uplink, later)
    kafka_topic_rpc_responses: str = "tb.rpc.responses"  # RPC responses (uplink, later)
    kafka_linger_ms: Annotated[int, Field(ge=0, le=900_000)] = 1  # 0 = lowest latency; more = bigger batches
    kafka_compression: KafkaCompression = KafkaCompression.LZ4  # JSON shrinks ~3x; lz4 costs least CPU
    kafka_delivery_timeout_ms: Annotated[int, Field(ge=1000)] = 10_000  # then a record is spooled instead
    kafka_max_in_flight_batches: Positive = 4  # pipeline batches awaiting Kafka's acks at once
    kafka_message_max_bytes: Annotated[int, Field(ge=1000)] = 1_000_000  # larger records are rejected

    # --- store and forward spool (DATA_DIR/spool/<sink>) ---
    spool_enabled: bool = True  # keep records in DATA_DIR while the backend is down, replay them later
    spool_max_bytes: Annotated[int, Field(ge=1_048_576)] = 1_073_741_824  # full -> visible refusals

    # --- pipeline and limits (seed + bounds) ---
    batch_size: Positive = 100
    batch_timeout: PositiveSeconds = 1.0
    max_payload_size: Positive = 65536
    queue_max_records: Positive = 100_000  # pipeline bound: beyond it devices are refused (503 / 5.03 / 0x97)
    retry_after_seconds: Positive = 1  # Retry-After / Max-Age sent with an overload refusal
    json_type_cast_enabled: bool = True  # ThingsBoard's default: "42" is stored as the number 42
    json_max_string_value_length: Annotated[int, Field(ge=0)] = 0  # 0 = unlimited, as in ThingsBoard
    rate_limit_enabled: bool = False
    rate_limit_requests_per_second: Positive = 100

    # --- authentication ---
    auth_cache_ttl_seconds: PositiveSeconds = 3600.0
    auth_negative_cache_ttl_seconds: PositiveSeconds = 5.0

    # --- operations ---
    data_dir: Path = Path("./data")
    metrics_port: Port = 9090
    metrics_bind_address: str = "0.0.0.0"
    admin_port: Port = 0  # localhost-only admin API for the CLI; 0 = pick a free port (written to DATA_DIR)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.JSON
    shutdown_timeout_seconds: PositiveSeconds = 10.0

    @field_validator("kafka_bootstrap_servers", mode="before")
    @classmethod
    def _servers(cls, value: Any) -> Any:
        """Accept the seed's JSON list form and the plain comma-separated form."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def tb_base_url(self) -> str:
        return f"{self.tb_protocol.value}://{self.tb_host}:{self.tb_port}"

    @property
    def tb_auth_active(self) -> bool:
        """Check tokens against ThingsBoard: as TB_AUTH_ENABLED says, by default whenever forwarding there."""
        return self.tb_http_enabled if self.tb_auth_enabled is None else self.tb_auth_enabled


def load_settings(**overrides: Any) -> Settings:
    """Read and validate every setting; raise ``ConfigError`` with one line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from None
    except ValueError as exc:  # a list setting that is not valid JSON, raised before field validation
        raise ConfigError([str(exc)]) from None


def _describe(error: Any) -> str:
    name = "_".join(str(part) for part in error["loc"] if isinstance(part, str)).upper() or "SETTINGS"
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"{name}: {error['msg']}{shown}"
